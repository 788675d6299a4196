"""CPU emulator for the project's CUDA kernels: CuPy's RawModule / RawKernel
API over the very same ``.cu`` source, compiled by g++ and run on the CPU.

    from kernels import emulator
    module = emulator.RawModule(code=source, options=("-std=c++17",),
                                name_expressions=("scale<float>",))
    kernel = module.get_function("scale<float>")
    kernel((blocks,), (256,), (x, y, numpy.int32(n)))   # NumPy arrays / CPU tensors

See docs/emulator.md for the supported CUDA subset, the modes (normal,
memcheck, asan, counters, racecheck) and the environment variables;
docs/counters.md for what the counters mode counts.
"""

from .device import PROPERTIES, DeviceProperties, getDeviceProperties
from .errors import (
    AddressSanitizerError,
    CompileError,
    EmulatorError,
    KernelArgumentError,
    KernelDeadlockError,
    KernelTrapError,
    LaunchConfigError,
    MemcheckError,
    RaceCheckError,
    UnsupportedFeatureError,
    WarpMatrixError,
)
from .modes import MODES, current_mode, mode
from .module import RawKernel, RawModule
from .traced import AccessCounts, BufferCounts, LaunchCounters, recording

__all__ = [
    "AccessCounts",
    "BufferCounts",
    "LaunchCounters",
    "MODES",
    "PROPERTIES",
    "AddressSanitizerError",
    "CompileError",
    "DeviceProperties",
    "EmulatorError",
    "KernelArgumentError",
    "KernelDeadlockError",
    "KernelTrapError",
    "LaunchConfigError",
    "MemcheckError",
    "RaceCheckError",
    "RawKernel",
    "RawModule",
    "UnsupportedFeatureError",
    "WarpMatrixError",
    "current_mode",
    "getDeviceProperties",
    "mode",
    "recording",
]
