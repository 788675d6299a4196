"""The source transform: CUDA C++ as CuPy takes it -> C++ that g++ compiles.

The shim header (``shim/dcn_emulator.h``) handles nearly everything with
macros and overloads. What a header cannot do is done here, as a small set of
text rewrites that keep every line where it was (so g++'s line numbers and
``__LINE__`` in deadlock reports are the user's):

1. ``__shared__ T name[N];`` inside a function becomes a ``static
   thread_local`` array (one OS thread runs one block at a time, so
   per-OS-thread statics are per-block), followed on the same line by a call
   that poisons it with NaN bit patterns the first time a thread of a new
   block gets there. At namespace scope it becomes ``static thread_local``
   without the poisoning.
2. ``extern __shared__ T name[];`` becomes a ``T*`` to the OS thread's
   dynamic shared-memory buffer (poisoned by the runtime at each block start).
3. ``#include "file"`` that resolves against the ``-I`` options is inlined
   (with ``#line`` directives), so that rewrites and checks apply to it too.
4. Constructs the emulator cannot run (inline PTX, textures, cooperative
   groups / grid sync, device-side launches, ...) raise
   UnsupportedFeatureError naming the construct and line.

It also reads each ``__global__`` function's name and parameter names (for
error messages) and whether the source uses barriers or warp collectives
(else every thread runs as a plain call, without fibers).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .errors import CompileError, UnsupportedFeatureError

MAIN_FILE = "source.cu"

UNSUPPORTED: tuple[tuple[str, str, str], ...] = (
    (r"\b(?:asm|__asm__|__asm)\b\s*(?:volatile\b|__volatile__\b)?\s*\(",
     "inline assembly (asm / inline PTX)",
     "write the operation in CUDA C++ or use an intrinsic"),
    (r"\b(?:tex[123]D\w*|texCubemap\w*|surf[123]D\w*|cudaTextureObject_t|cudaSurfaceObject_t)\b"
     r"|\btexture\s*<",
     "texture and surface memory", "read through a plain pointer (__ldg) instead"),
    (r"\b(?:cooperative_groups|this_grid|grid_group|this_multi_grid)\b",
     "cooperative groups (including grid-wide sync)",
     "use __syncthreads() and the __shfl_*_sync / vote intrinsics; split grid-wide "
     "phases into separate launches"),
    (r"<<<|\bcuda(?:DeviceSynchronize|LaunchDevice|GetParameterBuffer)\b",
     "kernel launches from device code (dynamic parallelism)",
     "launch the second kernel from the host"),
    (r"\b__hmma\w*|\b__imma\w*|\b__bmma\w*", "tensor core builtins (__hmma_*)",
     "use nvcuda::wmma from <mma.h>"),
    (r"\b(?:__shfl|__shfl_up|__shfl_down|__shfl_xor|__ballot|__any|__all)\s*\(",
     "warp intrinsics without _sync (removed for sm_70+)", "use the _sync variants"),
    (r"\b(?:__match_any_sync|__match_all_sync|__reduce_\w+_sync)\b",
     "warp match / reduce intrinsics", "not implemented by the emulator"),
)

COLLECTIVES = re.compile(
    r"\b(?:__syncthreads\w*|__syncwarp|__shfl\w*_sync|__ballot_sync|__all_sync|__any_sync"
    r"|load_matrix_sync|store_matrix_sync|mma_sync)\b")

# Words that end a parameter's type, never its name (``const float``, ``int``).
_TYPE_WORDS = frozenset((
    "void", "bool", "char", "short", "int", "long", "float", "double", "signed", "unsigned",
    "const", "volatile", "__restrict__", "__restrict", "size_t", "half", "__half", "__half2",
    "__nv_bfloat16", "__nv_bfloat162", "float2", "float3", "float4", "double2", "int2", "int4",
    "uint2", "uint4"))
_DECL_ATTRIBUTES = re.compile(r"\b(?:__align__|alignas|__attribute__)\s*\(")


@dataclasses.dataclass(frozen=True)
class KernelSignature:
    """A ``__global__`` function as written in the source."""

    name: str  # unqualified, as ``get_function`` takes a plain kernel
    qualified: str  # with its namespaces, to take its address at global scope
    is_template: bool
    param_names: tuple[str, ...]
    param_texts: tuple[str, ...]  # each parameter's declaration, whitespace-normalised


@dataclasses.dataclass(frozen=True)
class TransformedSource:
    text: str
    kernels: dict[str, KernelSignature]  # by unqualified name
    uses_collectives: bool


def transform(code: str, include_dirs: tuple[str, ...] = ()) -> TransformedSource:
    state = _TransformState(include_dirs=tuple(Path(d) for d in include_dirs))
    text = _transform_file(code, MAIN_FILE, None, state, depth=0)
    return TransformedSource(text, state.kernels, state.uses_collectives)


@dataclasses.dataclass
class _TransformState:
    include_dirs: tuple[Path, ...]
    kernels: dict[str, KernelSignature] = dataclasses.field(default_factory=dict)
    uses_collectives: bool = False
    shared_counter: int = 0
    inlined_once: set[Path] = dataclasses.field(default_factory=set)


def _transform_file(text: str, filename: str, path: Path | None, state: _TransformState,
                    depth: int) -> str:
    code = mask_comments_and_strings(text)
    _check_unsupported(code, filename)
    state.uses_collectives |= bool(COLLECTIVES.search(code))
    body = _mask_preprocessor(code)
    edits: list[tuple[int, int, str]] = []
    for position, scopes in _scan_scopes(body, r"\b__shared__\b|\b__global__\b"):
        if body.startswith("__global__", position):
            kernel = _parse_kernel(body, text, position, scopes)
            if kernel.name not in state.kernels or not state.kernels[kernel.name].param_names:
                state.kernels[kernel.name] = kernel
        else:
            edits.append(_rewrite_shared(body, text, position, scopes, filename, state))
    for match in re.finditer(r"\b__shared__\b", code):
        position = match.start()
        if body[position] != code[position]:  # blanked: inside a preprocessor directive
            raise UnsupportedFeatureError(
                f"{filename}:{line_of(code, position)}: __shared__ inside a preprocessor directive "
                "is not supported by the CPU emulator; declare shared arrays in the kernel body")
    edits += _inline_includes(code, text, filename, path, state, depth)
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


# ------------------------------------------------------------------ masking --
def mask_comments_and_strings(text: str) -> str:
    """``text`` with comments and the contents of string / char literals
    replaced by spaces (newlines kept), so offsets and lines stay the same."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out[i:end] = " " * (end - i)
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out[i:end] = [ch if ch == "\n" else " " for ch in text[i:end]]
            i = end
        elif c in "\"'" and not (c == "'" and i > 0 and text[i - 1].isalnum()):  # 1'000 separator
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out[i + 1:j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _mask_preprocessor(code: str) -> str:
    """Blanks preprocessor directives (with their continuation lines)."""
    lines = code.split("\n")
    continued = False
    for k, line in enumerate(lines):
        if continued or line.lstrip().startswith("#"):
            continued = line.endswith("\\")
            lines[k] = " " * len(line)
    return "\n".join(lines)


def line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


# ------------------------------------------------------------------- checks --
def _check_unsupported(code: str, filename: str) -> None:
    for pattern, construct, hint in UNSUPPORTED:
        match = re.search(pattern, code)
        if match:
            advice = f" ({hint})" if hint else ""
            raise UnsupportedFeatureError(
                f"{filename}:{line_of(code, match.start())}: {construct} is not supported by the "
                f"CPU emulator{advice}: {match.group(0).strip()!r}")


# ------------------------------------------------------------------- scopes --
def _scan_scopes(body: str, pattern: str):
    """Yields (position, enclosing scopes) for each match of ``pattern``; a
    scope is a namespace name, "" for an anonymous namespace or ``extern
    "C"``, or None for any other brace (function bodies, classes)."""
    scopes: list[str | None] = []
    for match in re.finditer(r"[{}]|" + pattern, body):
        token = match.group(0)
        if token == "{":
            before = body[max(0, match.start() - 200):match.start()]
            named = re.search(r"\bnamespace\s+([\w:]+)\s*$", before)
            if named:
                scopes.append(named.group(1))
            elif re.search(r'(?:\bnamespace|\bextern\s*"\s*")\s*$', before):
                scopes.append("")
            else:
                scopes.append(None)
        elif token == "}":
            if scopes:
                scopes.pop()
        else:
            yield match.start(), tuple(scopes)


def _in_function(scopes: tuple[str | None, ...]) -> bool:
    return None in scopes


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside (), [], {} and <>."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _matching(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at ``open_at``."""
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
    opener, closer = text[open_at], pairs[text[open_at]]
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    raise CompileError(f"unbalanced {opener!r} at offset {open_at} of the kernel source")


# ------------------------------------------------------------ shared memory --
def _rewrite_shared(body: str, text: str, position: int, scopes, filename: str,
                    state: _TransformState) -> tuple[int, int, str]:
    start = max(body.rfind(c, 0, position) for c in ";{}") + 1
    end = position
    depth = 0
    while end < len(body) and not (body[end] == ";" and depth == 0):
        depth += body[end] in "([{"
        depth -= body[end] in ")]}"
        end += 1
    if end >= len(body):
        raise CompileError(f"{filename}:{line_of(body, position)}: __shared__ declaration "
                           "without a terminating ';'")
    declaration = body[start:end]
    line = line_of(body, position)
    declarators = _split_top_level(_blank_attributes(declaration))
    names = [_declarator_name(d, filename, line) for d in declarators]
    newlines = "\n" * text.count("\n", start, end)
    original = text[start:end]

    if re.search(r"\bextern\b", declaration):
        if len(names) != 1 or not re.search(r"\[\s*\]\s*$", declarators[0]):
            raise UnsupportedFeatureError(
                f"{filename}:{line}: the CPU emulator supports `extern __shared__ T name[];` with "
                "one one-dimensional array per declaration")
        first = declarators[0]
        element = first[:first.rfind(names[0])]
        element = re.sub(r"\b(?:extern|__shared__|static)\b", " ", element)
        element = " ".join(_blank_attributes(element).split())
        storage = "" if _in_function(scopes) else "static thread_local "
        pointer = (f"{storage}{element}* const {names[0]} = "
                   f"reinterpret_cast<{element}*>(dcn_current->dynamic_shared);")
        return start, end + 1, pointer + newlines

    storage = "thread_local" if re.search(r"\bstatic\b", declaration) else "static thread_local"
    rewritten = re.sub(r"\b__shared__\b", storage, original, count=1)
    if not _in_function(scopes):
        return start, end, rewritten
    poison = []
    for name in names:
        state.shared_counter += 1
        serial = f"dcn_shared_poisoned_{state.shared_counter}"
        poison.append(f" static thread_local unsigned long long {serial};"
                      f" ::dcn::poison_shared_once_per_block((void*)&{name}, sizeof({name}), {serial});")
    return start, end + 1, rewritten + ";" + "".join(poison)


def _blank_attributes(text: str) -> str:
    """``text`` with ``__align__(...)``-style attributes, arguments included,
    replaced by spaces."""
    blanked = list(text)
    for match in _DECL_ATTRIBUTES.finditer(text):
        close = _matching(text, match.end() - 1)
        blanked[match.start():close + 1] = " " * (close + 1 - match.start())
    return "".join(blanked)


def _declarator_name(declarator: str, filename: str, line: int) -> str:
    declarator = declarator.split("=")[0]
    bracket = declarator.find("[")
    head = declarator[:bracket] if bracket >= 0 else declarator
    identifiers = re.findall(r"[A-Za-z_]\w*", head)
    if not identifiers:
        raise CompileError(f"{filename}:{line}: cannot read the name of a __shared__ declaration")
    return identifiers[-1]


# ------------------------------------------------------------------ kernels --
_NOT_A_NAME = frozenset({"__launch_bounds__", "__attribute__", "__align__", "alignas",
                         "__declspec"})


def _parse_kernel(body: str, text: str, position: int, scopes) -> KernelSignature:
    for match in re.finditer(r"\(", body[position:]):
        open_at = position + match.start()
        head = body[position:open_at].rstrip()
        name_match = re.search(r"([A-Za-z_]\w*)$", head)
        if name_match and name_match.group(1) not in _NOT_A_NAME:
            break
    else:
        raise CompileError(f"cannot read the kernel declared at line {line_of(body, position)}")
    name = name_match.group(1)
    close = _matching(body, open_at)
    declaration_start = max(body.rfind(c, 0, position) for c in ";{}") + 1
    is_template = bool(re.search(r"\btemplate\s*<", body[declaration_start:position]))
    # From the masked body: a comment between parameters is no part of the declaration.
    params = [" ".join(p.split()) for p in _split_top_level(body[open_at + 1:close])]
    params = [] if params == [""] or params == ["void"] else params
    namespaces = [s for s in scopes if s]
    qualified = "::".join([*namespaces, name])
    return KernelSignature(name, qualified, is_template,
                           tuple(_param_name(p, i) for i, p in enumerate(params)), tuple(params))


def _param_name(param: str, index: int) -> str:
    declarator = param.split("=")[0].strip()
    words = re.findall(r"[A-Za-z_]\w*", declarator)
    if len(words) >= 2 and re.search(r"[A-Za-z_]\w*$", declarator) and words[-1] not in _TYPE_WORDS:
        return words[-1]
    return f"arg{index}"


# ----------------------------------------------------------------- includes --
def _inline_includes(code: str, text: str, filename: str, path: Path | None,
                     state: _TransformState, depth: int) -> list[tuple[int, int, str]]:
    edits = []
    for match in re.finditer(r'^[ \t]*#[ \t]*include[ \t]*"', code, re.MULTILINE):
        line_end = text.find("\n", match.end())
        line_end = len(text) if line_end < 0 else line_end
        name = text[match.end():line_end].split('"')[0]
        found = _resolve_include(name, path, state.include_dirs)
        if found is None:
            continue  # g++ resolves it (or reports it missing) through the -I options
        if depth > 32:
            raise CompileError(f"{filename}: #include nesting deeper than 32 (recursive include?)")
        header = found.read_text()
        if found in state.inlined_once:
            inlined = ""
        else:
            if re.search(r"^\s*#\s*pragma\s+once\b", header, re.MULTILINE):
                state.inlined_once.add(found)
            inlined = _transform_file(header, str(found), found, state, depth + 1)
        next_line = line_of(text, line_end) + 1
        replacement = f'#line 1 "{found}"\n{inlined}\n#line {next_line} "{filename}"'
        edits.append((match.start(), line_end, replacement))
    return edits


def _resolve_include(name: str, including: Path | None, include_dirs: tuple[Path, ...]):
    candidates = ([including.parent] if including else []) + list(include_dirs)
    for directory in candidates:
        candidate = (directory / name).resolve()
        if candidate.is_file():
            return candidate
    return None
