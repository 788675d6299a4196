"""memcheck mode: guard zones around every array argument.

Each array is copied into a buffer aligned to 256 bytes, as cudaMalloc
aligns, with guard zones of a known pattern right before its first byte and
right after its last one; after the launch the data is copied back and the
zones are checked. A changed guard byte is a write out of bounds: the error
names the argument, how many bytes were hit and where. Writes into the
padding up to the next 256 bytes are reported too, although on the GPU they
land in the allocation's slack and go unnoticed.

Arguments that are the very same memory (an in-place kernel given ``x`` as
both input and output) share one guarded copy, so aliasing is preserved.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence

import numpy as np

from .arguments import ArrayArg, Param
from .errors import EmulatorError, MemcheckError

GUARD_BYTES = 16 * 1024
ALIGNMENT = 256
_PATTERN = np.frombuffer(bytes.fromhex("DEADBEEF5AFEC0DE") * (GUARD_BYTES // 8), dtype=np.uint8)


class _GuardedCopy:
    def __init__(self, original: ArrayArg):
        self.original = original
        self.buffer = np.empty(GUARD_BYTES * 2 + original.nbytes + ALIGNMENT, dtype=np.uint8)
        self.start = GUARD_BYTES + (-(self.buffer.ctypes.data + GUARD_BYTES)) % ALIGNMENT
        self.before = self.buffer[self.start - GUARD_BYTES:self.start]
        self.after = self.buffer[self.start + original.nbytes:self.start + original.nbytes
                                 + GUARD_BYTES]
        self.before[:] = _PATTERN
        self.after[:] = _PATTERN
        self.address = self.buffer.ctypes.data + self.start
        ctypes.memmove(self.address, original.address, original.nbytes)

    def as_arg(self) -> ArrayArg:
        return ArrayArg(self.buffer, self.address, self.original.nbytes, self.original.writable)

    def copy_back(self) -> None:
        if self.original.writable:
            ctypes.memmove(self.original.address, self.address, self.original.nbytes)

    def violations(self) -> list[str]:
        found = []
        changed = np.flatnonzero(self.before != _PATTERN)
        if changed.size:
            first, last = changed[0] - GUARD_BYTES, changed[-1] - GUARD_BYTES
            found.append(f"{changed.size} byte(s) written before its start, at byte offsets "
                         f"{first}..{last}")
        changed = np.flatnonzero(self.after != _PATTERN)
        if changed.size:
            n = self.original.nbytes
            slack = -n % ALIGNMENT
            note = (" (inside the 256-byte allocation padding: unnoticed on a GPU, still a bug)"
                    if changed[-1] < slack else "")
            found.append(f"{changed.size} byte(s) written past its end, at byte offsets "
                         f"{n + changed[0]}..{n + changed[-1]} of a {n}-byte array{note}")
        return found


@contextlib.contextmanager
def guarded(kernel_name: str, params: Sequence[Param], values: Sequence[ArrayArg | bytes]
            ) -> Iterator[list[ArrayArg | bytes]]:
    """Yields ``values`` with each array replaced by a guarded copy; on exit
    copies the data back and raises MemcheckError for any guard hit."""
    copies: dict[tuple[int, int], _GuardedCopy] = {}
    # Null pointers stay null: a kernel tests them, and there is nothing to guard.
    arrays = [(p, v) for p, v in zip(params, values, strict=True)
              if isinstance(v, ArrayArg) and v.address]
    for param, value in arrays:
        key = (value.address, value.nbytes)
        if key not in copies:
            _refuse_partial_overlap(kernel_name, param, value, copies)
            copies[key] = _GuardedCopy(value)
    try:
        yield [copies[(v.address, v.nbytes)].as_arg() if isinstance(v, ArrayArg) and v.address
               else v for v in values]
    finally:
        for copy in copies.values():
            copy.copy_back()
    problems, reported = [], set()
    for param, value in arrays:
        key = (value.address, value.nbytes)
        if key not in reported:
            reported.add(key)
            problems += [f"{param.describe()}: {v}" for v in copies[key].violations()]
    if problems:
        raise MemcheckError(f"kernel '{kernel_name}' wrote out of bounds:\n  " + "\n  ".join(problems))


def _refuse_partial_overlap(kernel_name: str, param: Param, value: ArrayArg,
                            copies: dict[tuple[int, int], _GuardedCopy]) -> None:
    for address, nbytes in copies:
        if address < value.address + value.nbytes and value.address < address + nbytes:
            raise EmulatorError(
                f"kernel '{kernel_name}', {param.describe()}: memcheck cannot guard arrays that "
                "partially overlap another argument; run this launch in normal or asan mode")
