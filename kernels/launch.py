"""Launching our CUDA kernels from PyTorch: CuPy on a GPU, ``kernels.emulator`` on the CPU.

Every op family builds its kernels the same way::

    kernel = launch.module(SOURCE, tensor.device).function("my_kernel<float>")
    kernel(grid, block, (tensor_a, tensor_b, launch.int32(n)))

The backend follows the tensors' device: CUDA tensors run through
``cupy.RawModule`` (imported lazily, so CPU-only machines need no CuPy), CPU
tensors through ``kernels.emulator.RawModule``, which runs the very same
``.cu`` source on the CPU. Both get the source's registered options and name
expressions (``kernels.cuda_sources``), so what the build check compiles is
what runs.

Kernel arguments are passed as CuPy passes them: tensors (and, on the CPU,
numpy arrays) become pointers to their data, zero-copy; value parameters must be numpy
scalars of the exact declared width (:func:`int32`, :func:`int64`,
:func:`float32`). A bare Python ``int`` or ``float`` is rejected: CuPy would
silently pass it as 64 bits, which a kernel declaring ``int`` misreads.
A null pointer is :func:`null` (an empty tensor of the parameter's dtype: the
emulator checks pointer dtypes, and an empty tensor has no storage).

On the GPU, kernels are launched on PyTorch's current stream of the tensors'
device, so they order correctly with the PyTorch work around them (and inside
CUDA graphs / ``torch.cuda.stream`` blocks). Launch errors that CUDA reports
at launch time (a bad configuration, too many resources) are raised at once,
naming the kernel and its configuration; errors inside a kernel (an illegal
address) surface, as with any CUDA work, at a later launch or synchronisation
-- the message of a failed launch says so, and ``CUDA_LAUNCH_BLOCKING=1``
makes them surface at their own launch.

CPU tensors take ``cpu_backend``'s path: ``"emulator"`` (the default) calls
``kernels.emulator`` directly; ``"cupy"`` runs the CUDA branch above, with
``cupy.RawModule`` answered by the emulator. Only the CuPy stand-in
(``kernels.emulator.cupy_shim``) sets it, so that CI exercises the GPU path.

Every launch is appended to the active :func:`recorded_launches` logs, with
the reason a wrapper gives for the variant it picked (a fallback, say), so
the harness can record which kernel actually ran.

Launch configurations are derived from :func:`device_properties`:
``torch.cuda.get_device_properties`` on a GPU, the emulator's on the CPU.
Before either backend sees it, a configuration is checked against CUDA's
limits (block size, grid dimensions), so the emulator rejects what a GPU would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kernels.cuda_sources import CudaSource

# CUDA's architectural launch limits (every GPU since compute capability 3.0).
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
INT32_MAX = 2**31 - 1

Dim3 = tuple[int, int, int]


# --------------------------------------------------------------------------- #
# Output allocation: NaN-poisoned during correctness runs.
# --------------------------------------------------------------------------- #

# A process-wide depth, not a thread-local: autograd runs CUDA backward passes
# on its own worker threads, and their outputs must be poisoned as well.
_poison_depth = 0
_poison_lock = threading.Lock()


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """While active, :func:`new_output` fills every tensor it returns with NaN.

    The harness enables it around correctness runs: a kernel that leaves an
    output element unwritten then shows up as NaN instead of passing with
    whatever the allocator left there.
    """
    global _poison_depth
    with _poison_lock:
        _poison_depth += 1
    try:
        yield
    finally:
        with _poison_lock:
            _poison_depth -= 1


def outputs_poisoned() -> bool:
    return _poison_depth > 0


def new_output(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Uninitialised tensor for a kernel to write every element of (NaN-filled when poisoned).

    Every tensor a kernel writes goes through here, scratch buffers included.
    Accumulators that must start at zero use ``torch.zeros`` instead.
    """
    if outputs_poisoned():
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


# --------------------------------------------------------------------------- #
# The launch log: which kernels ran, and why that variant.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """One kernel launch: the name expression that ran, its configuration, and the
    reason its wrapper gave for picking it ("" when there was no choice)."""

    kernel: str
    grid: Dim3
    block: Dim3
    shared_mem: int
    variant_reason: str

    def describe(self) -> str:
        return f"{self.kernel} ({self.variant_reason})" if self.variant_reason else self.kernel


# Process-wide, like the poison depth: autograd may launch from its worker threads.
_launch_logs: list[list[LaunchRecord]] = []
_launch_logs_lock = threading.Lock()


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[LaunchRecord]]:
    """While active, every launch is appended to the list it yields."""
    log: list[LaunchRecord] = []
    with _launch_logs_lock:
        _launch_logs.append(log)
    try:
        yield log
    finally:
        with _launch_logs_lock:
            _launch_logs.remove(log)


def variants(log: Sequence[LaunchRecord]) -> str:
    """The distinct kernels of ``log``, in launch order, each with its reason."""
    return "; ".join(dict.fromkeys(record.describe() for record in log))


def _record(record: LaunchRecord) -> None:
    with _launch_logs_lock:
        for log in _launch_logs:
            log.append(record)


# --------------------------------------------------------------------------- #
# Value parameters of the exact declared width.
# --------------------------------------------------------------------------- #


def int32(value: int) -> np.int32:
    """An ``int`` kernel parameter; raises if ``value`` does not fit in 32 bits."""
    if not -(2**31) <= value <= INT32_MAX:
        raise OverflowError(f"{value} does not fit a 32-bit int kernel parameter")
    return np.int32(value)


def int64(value: int) -> np.int64:
    """A ``long long`` kernel parameter."""
    if not -(2**63) <= value < 2**63:
        raise OverflowError(f"{value} does not fit a 64-bit kernel parameter")
    return np.int64(value)


def float32(value: float) -> np.float32:
    """A ``float`` kernel parameter."""
    return np.float32(value)


# --------------------------------------------------------------------------- #
# Device properties and launch-configuration helpers.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What launch configurations are computed from."""

    name: str
    multiprocessor_count: int
    max_threads_per_multiprocessor: int
    total_memory: int  # bytes

    @property
    def resident_threads(self) -> int:
        """Threads the device runs at once at full occupancy."""
        return self.multiprocessor_count * self.max_threads_per_multiprocessor


# The path CPU tensors take: "emulator" or "cupy" (see the module docstring).
cpu_backend = "emulator"


def _backend(device: torch.device) -> str:
    return "cupy" if device.type == "cuda" else cpu_backend


def clear_caches() -> None:
    """Forget compiled modules and device properties: the CuPy stand-in calls it
    when it starts and stops answering for CuPy and ``torch.cuda``."""
    with _modules_lock:
        _modules.clear()
    _device_properties.cache_clear()
    _cupy_stream.cache_clear()


@functools.cache
def _device_properties(backend: str, index: int | None) -> DeviceProperties:
    if backend == "cupy":
        props = torch.cuda.get_device_properties(index)
        return DeviceProperties(
            name=props.name,
            multiprocessor_count=props.multi_processor_count,
            max_threads_per_multiprocessor=props.max_threads_per_multi_processor,
            total_memory=props.total_memory,
        )
    from kernels import emulator

    props = emulator.PROPERTIES
    return DeviceProperties(
        name=props.name,
        multiprocessor_count=props.multiProcessorCount,
        max_threads_per_multiprocessor=props.maxThreadsPerMultiProcessor,
        total_memory=props.totalGlobalMem,
    )


def device_properties(device: torch.device | str) -> DeviceProperties:
    """Properties of ``device``: the GPU's, or the emulator's for the CPU."""
    device = _resolve(device)
    return _device_properties(_backend(device), device.index)


def null(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A null pointer argument of element type ``dtype``: an empty tensor, which owns no memory."""
    tensor = torch.empty(0, dtype=dtype, device=device)
    assert tensor.data_ptr() == 0, "an empty tensor must have no storage"
    return tensor


# A kernel thread that loops over channels sets up its work (sampling points,
# weights) once; below this many channels that fixed cost is no longer
# amortised, so channels are not split finer even when the GPU is not full.
MIN_CHANNELS_PER_THREAD = 4
# Aim for this many waves of resident threads when choosing channel slices.
TARGET_WAVES = 2


@dataclasses.dataclass(frozen=True)
class Slicing:
    """How the channels a thread loops over are split among threads."""

    channels_per_thread: int
    slices: int


def channel_slicing(channels: int, items: int, device: torch.device | str,
                    max_slices: int | None = None) -> Slicing:
    """Split ``channels`` among threads, each of the ``items`` work items
    getting one thread per slice: one slice when the items alone give
    ``TARGET_WAVES`` waves of resident threads, otherwise enough slices (at
    most ``max_slices``) of at least ``MIN_CHANNELS_PER_THREAD`` channels to
    get there."""
    target = TARGET_WAVES * device_properties(device).resident_threads
    most = -(-channels // MIN_CHANNELS_PER_THREAD)
    if max_slices is not None:
        most = min(most, max_slices)
    wanted = max(1, min(-(-target // max(items, 1)), most))
    per_thread = -(-channels // wanted)
    return Slicing(per_thread, -(-channels // per_thread))


def blocks(items: int, block_size: int) -> int:
    """Blocks of ``block_size`` threads that cover ``items`` threads."""
    return -(-items // block_size)


def _dim3(value: int | Sequence[int], what: str) -> Dim3:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(values) <= 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"{what} must be an int or 1-3 ints, got {value!r}")
    return tuple(int(v) for v in values) + (1,) * (3 - len(values))  # type: ignore[return-value]


def _check_configuration(name: str, grid: Dim3, block: Dim3, shared_mem: int) -> None:
    threads = block[0] * block[1] * block[2]
    if min(block) < 1 or threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(
            f"{name}: block {block} has {threads} threads; CUDA allows 1 to {MAX_THREADS_PER_BLOCK}"
        )
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID_DIM, strict=True)):
        if not 1 <= size <= limit:
            raise ValueError(f"{name}: grid {grid} dimension {axis} must be in 1..{limit}")
    if shared_mem < 0:
        raise ValueError(f"{name}: negative dynamic shared memory {shared_mem}")


# --------------------------------------------------------------------------- #
# Modules and kernels.
# --------------------------------------------------------------------------- #


def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"our kernels run on CUDA devices or, emulated, on the CPU; got {device}")
    return device


class Kernel:
    """One kernel of a module, callable as CuPy's ``RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, name: str, function: Any, device: torch.device) -> None:
        self.name = name
        self.device = device
        self._function = function
        self._through_cupy = _backend(device) == "cupy"

    def __call__(
        self,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        args: Sequence[Any],
        shared_mem: int = 0,
        *,
        variant_reason: str = "",
    ) -> None:
        """Launch; ``variant_reason`` says, for the launch log, why the caller picked
        this kernel variant (a fallback, say)."""
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
        _check_configuration(self.name, grid3, block3, shared_mem)
        converted = tuple(self._argument(i, arg) for i, arg in enumerate(args))
        if _launch_logs:
            _record(LaunchRecord(self.name, grid3, block3, shared_mem, variant_reason))
        if self._through_cupy:
            self._launch_cupy(grid3, block3, converted, shared_mem)
        else:
            self._function(grid3, block3, converted, shared_mem=shared_mem)

    def _argument(self, position: int, arg: Any) -> Any:
        if isinstance(arg, np.generic):
            return arg
        if isinstance(arg, torch.Tensor):
            if arg.device != self.device:
                raise ValueError(
                    f"{self.name}: argument {position} is on {arg.device}, the kernel runs on {self.device}"
                )
            if not arg.is_contiguous():
                raise ValueError(
                    f"{self.name}: argument {position} is not contiguous; kernels index raw memory densely"
                )
            if not self._through_cupy:
                return arg
            return _device_pointer(arg)  # an empty tensor's is 0: null
        if isinstance(arg, np.ndarray) and not self._through_cupy:
            return arg
        raise TypeError(
            f"{self.name}: argument {position} is a {type(arg).__name__}; pass tensors for pointers "
            "(launch.null for a null one) and numpy scalars of the declared width "
            "(launch.int32/int64/float32) for values"
        )

    def _launch_cupy(self, grid: Dim3, block: Dim3, args: tuple[Any, ...], shared_mem: int) -> None:
        import cupy

        stream = _cupy_stream(torch.cuda.current_stream(self.device.index).cuda_stream)
        try:
            with _on_device(self.device), stream:
                self._function(grid, block, args, shared_mem=shared_mem)
        except cupy.cuda.driver.CUDADriverError as error:
            # CUDA reports a fault of an asynchronous kernel (an illegal address)
            # at whatever launch comes next: it may not be this kernel's.
            raise RuntimeError(
                f"launching {self.name} on {self.device} with grid {grid}, block {block}, "
                f"{shared_mem} B dynamic shared memory failed: {error}. The error may be an "
                "earlier asynchronous kernel's, reported at this launch: rerun with "
                "CUDA_LAUNCH_BLOCKING=1 to see the launch that failed"
            ) from error


@dataclasses.dataclass(frozen=True)
class _StreamHandle:
    """A stream's handle under the CUDA stream protocol, which CuPy reads (not every
    torch release our GPU images carry implements it on its own streams)."""

    pointer: int

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


@functools.cache
def _cupy_stream(pointer: int) -> Any:
    """CuPy's view of the stream ``pointer``, through ``Stream.from_external``
    (``cupy.cuda.ExternalStream`` is deprecated in CuPy 14)."""
    import cupy

    return cupy.cuda.Stream.from_external(_StreamHandle(pointer))


def _device_pointer(tensor: torch.Tensor) -> np.uint64:
    """A CUDA tensor as the kernel sees it: its data address, by value.

    This is exactly what CuPy passes for a ``cupy.ndarray`` argument (an
    8-byte pointer value), without building a CuPy array through
    ``__cuda_array_interface__`` on every launch (microseconds per argument)
    and without a dtype, which matters for bfloat16: CuPy has none. The
    tensor is shared, never copied; the caller keeps it alive for the launch,
    and PyTorch's caching allocator orders reuse on the stream we launch on.
    """
    return np.uint64(tensor.data_ptr())


class Module:
    """The compiled kernels of one :class:`CudaSource` on one device."""

    def __init__(self, source: CudaSource, device: torch.device) -> None:
        self.source = source
        self.device = device
        self._raw = _raw_module(source, device)
        self._kernels: dict[str, Kernel] = {}

    def function(self, name_expression: str) -> Kernel:
        """The kernel ``name_expression`` (one of the source's registered name expressions)."""
        if name_expression not in self.source.name_expressions:
            raise KeyError(
                f"{name_expression!r} is not a registered name expression of {self.source.filename}; "
                f"registered: {', '.join(self.source.name_expressions)}"
            )
        kernel = self._kernels.get(name_expression)
        if kernel is None:
            with _on_device(self.device):
                function = self._raw.get_function(name_expression)
            kernel = self._kernels[name_expression] = Kernel(name_expression, function, self.device)
        return kernel


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Makes ``device`` CuPy's current device (CuPy compiles and loads per device;
    a CPU tensor through CuPy runs on the current one)."""
    if _backend(device) != "cupy":
        yield
        return
    import cupy

    with cupy.cuda.Device(device.index):  # None: the current device
        yield


def _raw_module(source: CudaSource, device: torch.device) -> Any:
    if _backend(device) == "cupy":
        import cupy

        return cupy.RawModule(
            code=source.code(), options=source.options, name_expressions=source.name_expressions
        )
    from kernels import emulator

    return emulator.RawModule(
        code=source.code(), options=source.options, name_expressions=source.name_expressions
    )


_modules: dict[tuple[str, str, str, int | None], Module] = {}
_modules_lock = threading.Lock()


def module(source: CudaSource, device: torch.device | str) -> Module:
    """The kernels of ``source`` for ``device``, compiled once per (source, backend, device)."""
    device = _resolve(device)
    key = (source.filename, _backend(device), device.type, device.index)
    with _modules_lock:
        found = _modules.get(key)
        if found is None:
            found = _modules[key] = Module(source, device)
    return found
