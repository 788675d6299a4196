"""Execution modes: ``normal``, ``memcheck``, ``asan``, ``counters`` and ``racecheck``.

Pick one for a block of code with ``with kernels.emulator.mode("memcheck"):``
or for a whole process with ``DCNBENCH_EMULATOR_MODE=memcheck``; the
context manager wins over the environment.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

MODES = ("normal", "memcheck", "asan", "counters", "racecheck")
_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("emulator_mode", default=None)


def current_mode() -> str:
    name = _selected.get() or os.environ.get("DCNBENCH_EMULATOR_MODE") or "normal"
    return _validated(name)


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Runs the launches inside the ``with`` block in mode ``name``."""
    token = _selected.set(_validated(name))
    try:
        yield
    finally:
        _selected.reset(token)


def _validated(name: str) -> str:
    if name not in MODES:
        raise ValueError(f"unknown emulator mode {name!r}; choose one of {MODES}")
    return name
