"""A CuPy stand-in: the project's GPU launch path, run on a CPU.

While :func:`emulated_gpu` is active, CPU tensors take ``kernels.launch``'s
CUDA branch (``launch.cpu_backend = "cupy"``): launch configurations come
from ``torch.cuda.get_device_properties``, arguments become 8-byte pointers,
the stream is taken from ``torch.cuda.current_stream`` and handed to CuPy
through ``cupy.cuda.Stream.from_external``, the kernel is fetched from a
``cupy.RawModule`` inside ``cupy.cuda.Device`` and launched inside the
stream, and CuPy's driver errors are translated. The real ``cupy`` package is
imported (it imports without a GPU); what would need a GPU is answered here:

- ``cupy.RawModule``: records the source and options CuPy would compile (and
  key its cache by), then runs the kernels through ``kernels.emulator``.
  Arguments are packed as CuPy packs them (``function.pyx``'s ``_pointer``
  and ``CScalar``): ``None`` a null pointer, a NumPy scalar (or one-element
  array) at its own width, a Python ``int`` (``bool`` included) / ``float`` /
  ``complex`` as int64 / float64 / complex128, anything else refused. A pointer argument's value must be the ``data_ptr()`` of a
  live CPU tensor, which then goes to the emulator with its dtype and size.
- ``cupy.cuda.Device``, ``Stream`` (``from_external``, ``with stream:``,
  ``get_current_stream``), ``ExternalStream`` (warning as CuPy 14 does),
  ``driver.CUDADriverError``, ``runtime.getDeviceProperties``.
- ``torch.cuda``: ``get_device_properties`` / ``get_device_name`` (an H200 or
  an A100), ``current_device``, ``device_count``, ``Stream``, ``stream`` and
  ``current_stream`` (thread-local, as in torch; every stream has its own
  made-up handle, the default stream 0). ``torch.cuda.is_available()`` stays
  False: tensors are CPU tensors, and the harness times nothing on them.

Every launch is recorded (:class:`Launch`: kernel, grid, block, stream
handle, device). Kernels run at once on the calling thread: nothing is
asynchronous, nothing is timed (see docs/emulator.md, "The CuPy stand-in").

In tests, the ``emulated_gpu`` fixture of ``tests/gpu_path/conftest.py``::

    def test_x(emulated_gpu):           # parametrise with indirect=True for "A100"
        out = dcnv3(...cpu tensors...)  # through launch.py's CuPy branch
        assert emulated_gpu.launches[-1].stream == 0

In a script::

    with cupy_shim.emulated_gpu("A100", run_kernels=False) as gpu:  # host path only
        ...

From the command line, a module run inside the stand-in::

    python -m kernels.emulator.cupy_shim [--gpu H200|A100] [--no-kernels] \\
        harness run --suite smoke --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import runpy
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import numpy as np

from .device import DeviceProperties
from .errors import KernelArgumentError
from .module import RawModule as EmulatorRawModule

MIB, GIB = 2**20, 2**30

# The device descriptions launch configurations are computed from.
GPUS = {
    "H200": DeviceProperties(
        name="NVIDIA H200", major=9, minor=0, multiProcessorCount=132,
        maxThreadsPerMultiProcessor=2048, regsPerMultiprocessor=65536,
        sharedMemPerBlockOptin=227 * 1024, sharedMemPerMultiprocessor=228 * 1024,
        l2CacheSize=50 * MIB, totalGlobalMem=141 * GIB,
    ),
    "A100": DeviceProperties(
        name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multiProcessorCount=108,
        maxThreadsPerMultiProcessor=2048, regsPerMultiprocessor=65536,
        sharedMemPerBlockOptin=163 * 1024, sharedMemPerMultiprocessor=164 * 1024,
        l2CacheSize=40 * MIB, totalGlobalMem=80 * GIB,
    ),
}  # fmt: skip

# CuPy 14's warning, word for word.
EXTERNAL_STREAM_DEPRECATION = (
    "ExternalStream is deprecated. Use Stream.from_external() instead to interoperate with "
    "external streams that implement the CUDA stream protocol."
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as CuPy received it."""

    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int
    stream: int  # the handle of the stream it was launched on (0: the default stream)
    device: int


@dataclasses.dataclass(frozen=True)
class CompiledSource:
    """What a ``cupy.RawModule`` was built from: CuPy's cache key is a hash of these
    (with the architecture and compiler versions), and of nothing else."""

    code: str
    options: tuple[str, ...]
    name_expressions: tuple[str, ...]


class CUDADriverError(RuntimeError):
    """Stands in for ``cupy.cuda.driver.CUDADriverError`` (the real one needs libcuda)."""

    def __init__(self, status: str) -> None:
        super().__init__(f"{status}: raised by the CuPy stand-in")
        self.status = status


class EmulatedGpu:
    """The state of one :func:`emulated_gpu` activation."""

    def __init__(self, gpu: str, run_kernels: bool) -> None:
        if gpu not in GPUS:
            raise ValueError(f"gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
        self.properties = GPUS[gpu]
        self.run_kernels = run_kernels
        self.launches: list[Launch] = []
        self.compiled: list[CompiledSource] = []
        self._failures: list[str] = []
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: device, torch and CuPy stream stacks
        self._tensors: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._handles = itertools.count(0x7E5700)

    def fail_next_launch(self, status: str = "CUDA_ERROR_ILLEGAL_ADDRESS") -> None:
        """The next launch raises ``CUDADriverError(status)``, as CUDA reports a
        sticky error of an earlier asynchronous kernel."""
        self._failures.append(status)

    # Per-thread state, as CUDA's current device and torch's current stream are.
    def _stack(self, name: str) -> list:
        if not hasattr(self._local, name):
            setattr(self._local, name, [])
        return getattr(self._local, name)

    def current_device(self) -> int:
        devices = self._stack("devices")
        return devices[-1] if devices else 0

    def new_handle(self) -> int:
        return next(self._handles) * 0x100

    def remember(self, tensor: Any, pointer: int) -> None:
        if pointer:
            self._tensors[pointer] = tensor

    def tensor_at(self, pointer: int, where: str) -> Any:
        tensor = self._tensors.get(pointer)
        if tensor is None:
            raise KernelArgumentError(
                f"{where}: pointer {pointer:#x} is no live tensor's data_ptr(); the CuPy stand-in "
                "passes a kernel the CPU tensors whose data_ptr() was taken"
            )
        return tensor

    def launch(self, name: str, kernel: Any, grid: Sequence[int], block: Sequence[int],
               args: Sequence[Any], shared_mem: int, stream: Any) -> None:
        stream = stream if stream is not None else _current_cupy_stream(self)
        with self._lock:
            self.launches.append(Launch(name, tuple(grid), tuple(block), int(shared_mem),
                                        stream.ptr, self.current_device()))
        if self._failures:
            raise CUDADriverError(self._failures.pop(0))
        packed = [_cupy_packed(name, i, arg) for i, arg in enumerate(args)]
        if not self.run_kernels:
            return
        params = kernel.params
        values = [
            self._emulator_argument(name, params[i], value) if i < len(params) else value
            for i, value in enumerate(packed)
        ]
        kernel(tuple(grid), tuple(block), tuple(values), shared_mem=int(shared_mem))

    def _emulator_argument(self, kernel: str, param: Any, value: Any) -> Any:
        if not param.is_pointer:
            return value
        where = f"kernel '{kernel}', {param.describe()}"
        if value is None:
            return None
        if value.dtype.kind not in "iu" or value.dtype.itemsize != 8:
            raise KernelArgumentError(
                f"{where}: a pointer is 8 bytes, but CuPy was given a numpy.{value.dtype.name} "
                f"({value.dtype.itemsize} bytes)"
            )
        return self.tensor_at(int(value), where) if int(value) else None


# The NumPy scalar types CuPy passes at their own width (function.pyx).
_CUPY_SCALAR_TYPES = {np.dtype(code).type for code in "?bhilqBHILQefdFD"}


def _cupy_packed(kernel: str, position: int, arg: Any) -> Any:
    """``arg`` as CuPy's ``_pointer`` passes it: None (a null pointer) or a NumPy
    scalar of the width CuPy gives it. Its order is kept: a Python bool is an
    int, so it goes as 8 bytes too."""
    if arg is None or type(arg) in _CUPY_SCALAR_TYPES:
        return arg
    if isinstance(arg, np.ndarray) and arg.size == 1:
        return arg.reshape(())[()]  # by value, at the array's width
    for python_type, dtype in ((int, np.int64), (float, np.float64), (complex, np.complex128)):
        if isinstance(arg, python_type):
            return dtype(arg)
    raise TypeError(f"kernel '{kernel}', argument {position}: Unsupported type {type(arg)}")


# --------------------------------------------------------------------------- #
# CuPy's side.
# --------------------------------------------------------------------------- #


@functools.cache
def _emulator_module(code: str, options: tuple[str, ...],
                     name_expressions: tuple[str, ...]) -> EmulatorRawModule:
    """One emulator module per source, across activations (g++ builds are cached on
    disk as well; this saves loading them again)."""
    return EmulatorRawModule(code=code, options=options, name_expressions=name_expressions)


class _RawModule:
    def __init__(self, gpu: EmulatedGpu, code: str, options: Sequence[str] = (),
                 name_expressions: Sequence[str] | None = None, **unused: Any) -> None:
        self._gpu = gpu
        source = CompiledSource(code, tuple(options), tuple(name_expressions or ()))
        with gpu._lock:
            gpu.compiled.append(source)
        self._module = _emulator_module(source.code, source.options, source.name_expressions)

    def get_function(self, name: str) -> _RawKernel:
        return _RawKernel(self._gpu, name, self._module.get_function(name))


class _RawKernel:
    def __init__(self, gpu: EmulatedGpu, name: str, kernel: Any) -> None:
        self._gpu, self.name, self._kernel = gpu, name, kernel

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *,
                 shared_mem: int = 0, stream: Any = None,
                 enable_cooperative_groups: bool = False) -> None:
        self._gpu.launch(self.name, self._kernel, grid, block, args, shared_mem, stream)


class _CupyStream:
    """``cupy.cuda.Stream`` over a handle; ``with stream:`` makes it current."""

    def __init__(self, gpu: EmulatedGpu, ptr: int) -> None:
        self._gpu, self.ptr = gpu, ptr

    def __enter__(self) -> _CupyStream:
        self._gpu._stack("cupy_streams").append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._gpu._stack("cupy_streams").pop()


def _current_cupy_stream(gpu: EmulatedGpu) -> _CupyStream:
    streams = gpu._stack("cupy_streams")
    return streams[-1] if streams else _CupyStream(gpu, 0)


def _cupy_stream_class(gpu: EmulatedGpu) -> type:
    class Stream(_CupyStream):
        null = _CupyStream(gpu, 0)

        def __init__(self, null: bool = False, non_blocking: bool = False,
                     ptds: bool = False, priority: int | None = None) -> None:
            super().__init__(gpu, 0 if null else gpu.new_handle())

        @classmethod
        def from_external(cls, obj: Any) -> _CupyStream:
            protocol = getattr(obj, "__cuda_stream__", None)
            if protocol is None:
                raise TypeError(f"{type(obj).__name__} does not implement __cuda_stream__")
            version, handle = protocol()
            if version != 0 or not isinstance(handle, int):
                raise TypeError(f"__cuda_stream__ returned {(version, handle)!r}, not (0, int)")
            return _CupyStream(gpu, handle)

    return Stream


def _cupy_external_stream_class(gpu: EmulatedGpu) -> type:
    class ExternalStream(_CupyStream):
        def __init__(self, ptr: int, device_id: int = -1) -> None:
            warnings.warn(EXTERNAL_STREAM_DEPRECATION, DeprecationWarning, stacklevel=2)
            super().__init__(gpu, ptr)

    return ExternalStream


def _cupy_device_class(gpu: EmulatedGpu) -> type:
    class Device:
        def __init__(self, device: int | None = None) -> None:
            self.id = gpu.current_device() if device is None else int(device)
            if self.id != 0:
                raise ValueError(f"device must be 0 (the stand-in has one GPU), got {device!r}")

        def __enter__(self) -> Device:
            gpu._stack("devices").append(self.id)
            return self

        def __exit__(self, *exc: Any) -> None:
            gpu._stack("devices").pop()

    return Device


# --------------------------------------------------------------------------- #
# torch.cuda's side.
# --------------------------------------------------------------------------- #


def _torch_properties(props: DeviceProperties) -> types.SimpleNamespace:
    """``torch.cuda.get_device_properties``'s fields, from CUDA's."""
    return types.SimpleNamespace(
        name=props.name, major=props.major, minor=props.minor,
        multi_processor_count=props.multiProcessorCount,
        max_threads_per_multi_processor=props.maxThreadsPerMultiProcessor,
        max_threads_per_block=props.maxThreadsPerBlock, warp_size=props.warpSize,
        regs_per_multiprocessor=props.regsPerMultiprocessor,
        shared_memory_per_block=props.sharedMemPerBlock,
        shared_memory_per_block_optin=props.sharedMemPerBlockOptin,
        shared_memory_per_multiprocessor=props.sharedMemPerMultiprocessor,
        L2_cache_size=props.l2CacheSize, total_memory=props.totalGlobalMem,
    )  # fmt: skip


def _check_torch_device(device: Any) -> None:
    index = getattr(device, "index", device)
    if index not in (None, 0):
        raise ValueError(f"device must be 0 (the stand-in has one GPU), got {device!r}")


def _torch_stream_class(gpu: EmulatedGpu) -> type:
    class Stream:
        """``torch.cuda.Stream``: a made-up handle."""

        def __init__(self, device: Any = None, priority: int = 0, *, handle: int | None = None):
            _check_torch_device(device)
            self.cuda_stream = gpu.new_handle() if handle is None else handle

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Stream) and other.cuda_stream == self.cuda_stream

        def __hash__(self) -> int:
            return hash(self.cuda_stream)

        def synchronize(self) -> None:
            """Kernels run at their launch: nothing is pending."""

        def wait_stream(self, stream: Any) -> None:
            """Nothing runs asynchronously: nothing to wait for."""

    return Stream


def _torch_stream_functions(gpu: EmulatedGpu, stream_class: type) -> dict[str, Any]:
    default = stream_class(handle=0)

    def current_stream(device: Any = None) -> Any:
        _check_torch_device(device)
        streams = gpu._stack("torch_streams")
        return streams[-1] if streams else default

    @contextlib.contextmanager
    def stream(s: Any) -> Iterator[None]:
        if s is None:
            yield
            return
        gpu._stack("torch_streams").append(s)
        try:
            yield
        finally:
            gpu._stack("torch_streams").pop()

    return {"current_stream": current_stream, "stream": stream, "default_stream":
            lambda device=None: default}


# --------------------------------------------------------------------------- #
# Activation.
# --------------------------------------------------------------------------- #

_active_lock = threading.Lock()
_active: EmulatedGpu | None = None


@contextlib.contextmanager
def emulated_gpu(gpu: str = "H200", run_kernels: bool = True) -> Iterator[EmulatedGpu]:
    """While active, CPU tensors go through ``kernels.launch``'s CUDA branch on
    an emulated ``gpu`` ("H200" or "A100"); ``run_kernels=False`` records and
    packs every launch without running the kernel (the host path alone)."""
    global _active
    import cupy
    import torch

    from kernels import launch

    state = EmulatedGpu(gpu, run_kernels)
    torch_stream = _torch_stream_class(state)
    original_data_ptr = torch.Tensor.data_ptr

    def data_ptr(tensor: Any) -> int:
        pointer = original_data_ptr(tensor)
        state.remember(tensor, pointer)
        return pointer

    def cupy_device_properties(device: int = 0) -> dict:
        properties = dataclasses.asdict(state.properties)
        properties["name"] = state.properties.name.encode()
        return properties

    def torch_device_properties(device: Any = None) -> types.SimpleNamespace:
        _check_torch_device(device)
        return _torch_properties(state.properties)

    patches = [
        (cupy, "RawModule", functools.partial(_RawModule, state)),
        (cupy.cuda, "Device", _cupy_device_class(state)),
        (cupy.cuda, "Stream", _cupy_stream_class(state)),
        (cupy.cuda, "ExternalStream", _cupy_external_stream_class(state)),
        (cupy.cuda, "get_current_stream", lambda device=None: _current_cupy_stream(state)),
        (cupy.cuda.driver, "CUDADriverError", CUDADriverError),
        (cupy.cuda.runtime, "getDeviceProperties", cupy_device_properties),
        (torch.cuda, "Stream", torch_stream),
        *((torch.cuda, name, f) for name, f in _torch_stream_functions(state, torch_stream).items()),
        (torch.cuda, "get_device_properties", torch_device_properties),
        (torch.cuda, "get_device_name", lambda device=None: state.properties.name),
        (torch.cuda, "current_device", state.current_device),
        (torch.cuda, "device_count", lambda: 1),
        (torch.Tensor, "data_ptr", data_ptr),
        (launch, "cpu_backend", "cupy"),
    ]
    with _active_lock:
        if _active is not None:
            raise RuntimeError("emulated_gpu is already active; it does not nest")
        _active = state
    try:
        with contextlib.ExitStack() as stack:
            for target, name, value in patches:
                stack.enter_context(mock.patch.object(target, name, value))
            stack.callback(launch.clear_caches)  # runs first on the way out
            launch.clear_caches()
            yield state
    finally:
        with _active_lock:
            _active = None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.emulator.cupy_shim",
        description="Run a Python module (as python -m would) with CPU tensors going through "
        "kernels.launch's CUDA branch on an emulated GPU.",
    )
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H200")
    parser.add_argument("--no-kernels", action="store_true",
                        help="record and pack each launch, run no kernel (the host path alone)")
    parser.add_argument("module", help="the module to run, e.g. harness")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args(argv)
    sys.argv = [options.module, *options.args]
    with emulated_gpu(options.gpu, run_kernels=not options.no_kernels) as gpu:
        try:
            runpy.run_module(options.module, run_name="__main__", alter_sys=True)
        finally:
            print(f"cupy_shim: {len(gpu.launches)} launches of {len(gpu.compiled)} modules "
                  f"through the CUDA branch on an emulated {gpu.properties.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
