"""The emulator's exceptions: one base class, one subclass per kind of finding.

Each also derives from the builtin exception a caller would naturally catch
(``TypeError`` for a mistyped argument, ``RuntimeError`` for a failed launch),
so code written against CuPy's exceptions keeps working.
"""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class of every error the CPU emulator raises."""


class CompileError(EmulatorError, RuntimeError):
    """g++ rejected the kernel source; the message carries its diagnostics,
    with line numbers of the source as given (``source.cu:LINE``)."""


class UnsupportedFeatureError(CompileError):
    """The source uses a CUDA feature the emulator does not implement."""


class KernelArgumentError(EmulatorError, TypeError):
    """A launch's arguments do not match the kernel's signature."""


class LaunchConfigError(EmulatorError, ValueError):
    """Grid, block or shared-memory size that no GPU would launch."""


class KernelDeadlockError(EmulatorError, RuntimeError):
    """Threads of a block wait at a barrier or warp collective that not all
    of them reach (or at different ``__syncthreads()`` calls)."""


class KernelTrapError(EmulatorError, RuntimeError):
    """A device ``assert`` failed or the kernel called ``__trap()``."""


class WarpMatrixError(EmulatorError, RuntimeError):
    """A wmma operation misused: the lanes of a warp passed different pointers,
    leading dimensions or layouts, a warp had fewer than 32 threads, or a
    pointer or leading dimension is misaligned."""


class MemcheckError(EmulatorError, RuntimeError):
    """memcheck mode: a kernel wrote outside an argument array."""


class AddressSanitizerError(EmulatorError, RuntimeError):
    """asan mode: AddressSanitizer caught an out-of-bounds access."""


class RaceCheckError(EmulatorError, RuntimeError):
    """racecheck mode: two threads of one launch accessed an element in conflict
    (a plain write and another access without an atomic or a barrier between)."""
