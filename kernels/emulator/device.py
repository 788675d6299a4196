"""Device properties for launch configuration on the CPU.

Op wrappers size grids from the device (``multiProcessorCount``, shared
memory per block, ...). Under the emulator they get an H100/H200 (sm_90)
so that launch shapes are the ones the GPU would run.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """The fields of ``cudaDeviceProp`` op wrappers use, named as CUDA names them."""

    name: str = "dcnbench CPU emulator (H200 limits)"
    major: int = 9
    minor: int = 0
    multiProcessorCount: int = 132
    maxThreadsPerBlock: int = 1024
    maxThreadsPerMultiProcessor: int = 2048
    warpSize: int = 32
    regsPerBlock: int = 65536
    regsPerMultiprocessor: int = 65536
    sharedMemPerBlock: int = 48 * 1024
    sharedMemPerBlockOptin: int = 227 * 1024
    sharedMemPerMultiprocessor: int = 228 * 1024
    l2CacheSize: int = 50 * 1024 * 1024
    totalGlobalMem: int = 141 * 10**9
    maxThreadsDim: tuple[int, int, int] = (1024, 1024, 64)
    maxGridSize: tuple[int, int, int] = (2**31 - 1, 65535, 65535)


PROPERTIES = DeviceProperties()


def getDeviceProperties(device: int = 0) -> dict:  # noqa: N802  (CuPy's name)
    """Like ``cupy.cuda.runtime.getDeviceProperties``: a dict, ``name`` as bytes."""
    properties = dataclasses.asdict(PROPERTIES)
    properties["name"] = PROPERTIES.name.encode()
    return properties
