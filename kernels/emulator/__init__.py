"""CPU emulator for the project's CUDA kernels: CuPy's RawModule / RawKernel
API over the very same ``.cu`` source, compiled by g++ and run on the CPU.

    from kernels import emulator
    module = emulator.RawModule(code=source, options=("-std=c++17",),
                                name_expressions=("scale<float>",))
    kernel = module.get_function("scale<float>")
    kernel((blocks,), (256,), (x, y, numpy.int32(n)))   # NumPy arrays / CPU tensors

See docs/emulator.md for the supported CUDA subset, the modes (normal,
memcheck, asan) and the environment variables.
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
    UnsupportedFeatureError,
)
from .modes import MODES, current_mode, mode
from .module import RawKernel, RawModule

__all__ = [
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
    "RawKernel",
    "RawModule",
    "UnsupportedFeatureError",
    "current_mode",
    "getDeviceProperties",
    "mode",
]
