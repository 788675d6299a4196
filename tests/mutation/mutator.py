"""Single-change mutants of a CUDA source: the edits a real bug makes.

``mutants(text)`` lists every mutant of one ``.cu`` / ``.cuh`` file's text;
each changes one span of one line of code (comments, strings and
preprocessor lines are never touched). The operators:

- ``relational``: ``<`` <-> ``<=``, ``>`` <-> ``>=`` (a bound moved by one);
- ``equality``: ``==`` <-> ``!=``; ``logical``: ``&&`` <-> ``||``;
- ``arithmetic``: binary ``+`` <-> ``-``, ``+=`` <-> ``-=``, ``min`` <-> ``max``
  (also ``fminf`` / ``fmaxf``);
- ``bound``: a loop bound ``i < n`` -> ``i < n - 1`` / ``n + 1``, a ``+ 1`` /
  ``- 1`` dropped, a loop start ``= 0`` -> ``= 1``;
- ``swap``: an identifier replaced by its x/y or h/w sibling (``dy`` -> ``dx``,
  ``pad_h`` -> ``pad_w``, ``height`` -> ``width``) when the sibling exists in
  the file;
- ``drop``: one additive term of a sum dropped (``a + b * c`` -> ``a``);
- ``atomic``: ``atomicAdd(p, v)`` -> ``*(p) += v`` (a race);
- ``barrier``: ``__syncthreads()`` / ``__syncwarp(...)`` removed;
- ``rounding``: ``_rn(`` -> ``_rz(`` (truncation), ``floorf`` <-> ``ceilf``,
  ``roundf`` -> ``rintf`` (halves to even).

Binary operators are recognised with a space on each side, the project's
style (clang-format), so template brackets (``static_cast<int>``) and
pointer declarations (``float* p``) are left alone.

A mutant's ``key`` (the line, stripped, with the change marked as
``[[old=>new]]``) names it independently of line numbers, so that the list
of equivalent mutants survives edits elsewhere in the file.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import re
from collections.abc import Iterator

OPERATORS = ("relational", "equality", "logical", "arithmetic", "bound", "swap", "drop",
             "atomic", "barrier", "rounding")


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One change: ``text[start:end]`` (``original``, starting on line ``line``,
    1-based) becomes ``replacement``; ``context`` is the whole lines it spans."""

    operator: str
    line: int
    start: int
    end: int
    original: str
    replacement: str
    context: str
    context_start: int  # offset of ``context`` in the text
    occurrence: int = 1  # of the same marked lines in the file, in file order

    @property
    def key(self) -> str:
        """The lines of the change, whitespace collapsed, the change marked as
        ``[[old=>new]]`` (and `` #n`` for the n-th of identical ones): names the
        mutant independently of line numbers."""
        at, to = self.start - self.context_start, self.end - self.context_start
        marked = (self.context[:at] + f"[[{self.original}=>{self.replacement}]]"
                  + self.context[to:])
        suffix = f" #{self.occurrence}" if self.occurrence > 1 else ""
        return " ".join(marked.split()) + suffix

    def apply(self, text: str) -> str:
        """``text`` (the file this mutant was made from) with the change made."""
        if text[self.start:self.end] != self.original:
            raise ValueError(f"line {self.line} no longer holds {self.original!r}")
        return text[:self.start] + self.replacement + text[self.end:]


def code_only(text: str) -> str:
    """``text`` with comments, string and character literals and preprocessor
    lines (with their continuations) blanked to spaces: same length, same
    line breaks, so offsets map back to the source."""
    out = list(text)
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and text[i:].lstrip(" \t").startswith("#"):
            end = i
            while True:  # a directive runs to an unescaped line end
                newline = text.find("\n", end)
                newline = n if newline < 0 else newline
                if newline > 0 and text[newline - 1] == "\\" and newline < n:
                    end = newline + 1
                    continue
                break
            for k in range(i, newline):
                if out[k] != "\n":
                    out[k] = " "
            i = newline
            continue
        at_line_start = c == "\n"
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif c in "\"'":
            end = i + 1
            while end < n and text[end] != c:
                end += 2 if text[end] == "\\" else 1
            end += 1
        else:
            i += 1
            continue
        for k in range(i, min(end, n)):
            if out[k] != "\n":
                out[k] = " "
        i = end
    return "".join(out)


# (pattern, replacement) per operator; patterns match in the code-only text.
_SWAPS_BY_PATTERN: dict[str, list[tuple[str, str]]] = {
    "relational": [(r" <= ", " < "), (r" < ", " <= "), (r" >= ", " > "), (r" > ", " >= ")],
    "equality": [(r" == ", " != "), (r" != ", " == ")],
    "logical": [(r" && ", " || "), (r" \|\| ", " && ")],
    "arithmetic": [(r" \+ ", " - "), (r" - ", " + "), (r" \+= ", " -= "), (r" -= ", " += "),
                   (r"\bmin\(", "max("), (r"\bmax\(", "min("), (r"\bfminf\(", "fmaxf("),
                   (r"\bfmaxf\(", "fminf(")],
    "rounding": [(r"_rn\(", "_rz("), (r"\bfloorf\(", "ceilf("), (r"\bceilf\(", "floorf("),
                 (r"\broundf\(", "rintf(")],
}
# An integer-literal step of one, as its own term: "+ 1" / "- 1" not followed by
# more digits, a decimal point or a multiplication.
_OFF_BY_ONE = re.compile(r" [+-] 1(?![\w.])(?! \*)")
_LOOP_BOUND = re.compile(r"for \([^;]*;\s*\w+ (<|<=) ([^;]+);")
_LOOP_START = re.compile(r"for \((?:int |long long )?\w+ = (0);")
_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")
_BARRIER = re.compile(r"\b(__syncthreads|__syncwarp)\([^()]*\);")
_ATOMIC_ADD = re.compile(r"\batomicAdd\(")


def _siblings(name: str) -> Iterator[str]:
    """``name`` with its x/y or h/w part swapped: dy -> dx, pad_h -> pad_w,
    height -> width, first_y -> first_x (and back)."""
    whole = {"height": "width", "width": "height", "rows": "columns", "columns": "rows"}
    if name in whole:
        yield whole[name]
    parts = name.split("_")
    letters = {"x": "y", "y": "x", "h": "w", "w": "h"}
    for index, part in enumerate(parts):
        if len(part) > 3:
            continue
        for position in (0, len(part) - 1):
            if part and part[position] in letters:
                swapped = part[:position] + letters[part[position]] + part[position + 1:]
                yield "_".join(parts[:index] + [swapped] + parts[index + 1:])


# What ends an additive term at its own bracket depth (besides ; , ? : and brackets).
_TERM_ENDS = (" + ", " - ", " < ", " <= ", " > ", " >= ", " == ", " != ", " && ", " || ",
              " = ", " += ", " -= ", " *= ", " /= ", " |= ", " & ", " | ", " << ", " >> ")


def _term_end(code: str, start: int) -> int:
    """End of the additive term that starts at ``start``: the next binary
    ``+`` / ``-`` (or comparison, logical or assignment operator) at the same
    bracket depth, or the closing bracket, ``,`` or ``;`` that ends the
    enclosing expression."""
    depth = 0
    i = start
    while i < len(code):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return i
            depth -= 1
        elif depth == 0 and (c in ";,?:" or code.startswith(_TERM_ENDS, i)):
            return i
        i += 1
    return i


def _call_arguments(code: str, open_paren: int) -> tuple[list[tuple[int, int]], int] | None:
    """Spans of the top-level arguments of the call whose '(' is at
    ``open_paren``, and the index of its ')'; None if it does not close."""
    depth, start, spans = 0, open_paren + 1, []
    for i in range(open_paren, len(code)):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                spans.append((start, i))
                return spans, i
        elif c == "," and depth == 1:
            spans.append((start, i))
            start = i + 1
    return None


def mutants(text: str) -> list[Mutant]:
    """Every mutant of ``text``, in file order (then operator order)."""
    code = code_only(text)
    identifiers = set(_IDENTIFIER.findall(code))
    line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    found: list[Mutant] = []

    def add(operator: str, line_start: int, start: int, end: int, replacement: str) -> None:
        """A mutant of the span [start, end) of the line starting at ``line_start``
        (offsets relative to that line; the span may run into later lines)."""
        start, end = line_start + start, line_start + end
        context_end = text.find("\n", end)
        context_end = len(text) if context_end < 0 else context_end
        number = bisect.bisect_right(line_starts, start)
        found.append(Mutant(operator, number, start, end, text[start:end], replacement,
                            text[line_start:context_end], line_start))

    for line_start in line_starts:
        line_end = text.find("\n", line_start)
        code_line = code[line_start: len(text) if line_end < 0 else line_end]
        if not code_line.strip():
            continue
        for operator, swaps in _SWAPS_BY_PATTERN.items():
            for pattern, replacement in swaps:
                for match in re.finditer(pattern, code_line):
                    add(operator, line_start, match.start(), match.end(), replacement)
        for match in _LOOP_BOUND.finditer(code_line):
            bound = match.group(2).strip()
            start = match.start(2)
            for shifted in (f"{bound} - 1", f"{bound} + 1"):
                add("bound", line_start, start, start + len(match.group(2)), shifted)
        for match in _LOOP_START.finditer(code_line):
            add("bound", line_start, match.start(1), match.end(1), "1")
        for match in _OFF_BY_ONE.finditer(code_line):
            add("bound", line_start, match.start(), match.end(), "")
        for match in _IDENTIFIER.finditer(code_line):
            for sibling in dict.fromkeys(_siblings(match.group())):
                if sibling != match.group() and sibling in identifiers:
                    add("swap", line_start, match.start(), match.end(), sibling)
        for match in re.finditer(r" [+-] ", code_line):
            end = _term_end(code_line, match.end())
            if code_line[match.end():end].strip():
                add("drop", line_start, match.start(), end, "")
        for match in _BARRIER.finditer(code_line):
            add("barrier", line_start, match.start(), match.end(), ";")
        rest = code[line_start:]
        for match in _ATOMIC_ADD.finditer(code_line):
            # The call may continue on the next lines (a vector atomic).
            call = _call_arguments(rest, match.end() - 1)
            if call is None or len(call[0]) != 2:
                continue
            (p0, p1), (v0, v1) = call[0]
            pointer = " ".join(text[line_start + p0: line_start + p1].split())
            value = " ".join(text[line_start + v0: line_start + v1].split())
            add("atomic", line_start, match.start(), call[1] + 1, f"*({pointer}) += {value}")
    seen: collections.Counter[str] = collections.Counter()
    numbered = []
    for mutant in found:
        seen[mutant.key] += 1
        numbered.append(dataclasses.replace(mutant, occurrence=seen[mutant.key]))
    return numbered
