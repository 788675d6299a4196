"""Every CUDA source in ``kernels/cuda/``, with how it is compiled and launched.

One ``CudaSource`` per ``.cu`` file. The op wrappers build their modules from
it (``kernels.launch.module(SOURCE)``), and ``dcnbench kernels`` compiles the
very same source with the very same options and template instantiations, so
the build check sees exactly what the GPU path runs. A ``.cu`` file without a
registration here is an error in the build check.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CUDA_DIR = Path(__file__).parent / "cuda"

# Options CuPy passes to NVRTC for every kernel source. ``-std=c++17`` for
# templates and ``if constexpr``; no ``--use_fast_math``: the contract wants
# float32 accuracy, and kernels opt into fast intrinsics explicitly. ``-I``:
# sources include the shared ``.cuh`` headers beside them, and CuPy compiles a
# copy of the source elsewhere.
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17", f"-I{CUDA_DIR}")


@dataclasses.dataclass(frozen=True)
class CudaSource:
    """A ``.cu`` file in ``kernels/cuda/`` and how it is instantiated.

    ``name_expressions`` are the kernel names CuPy's ``RawModule`` is asked
    for (template instantiations such as ``"deform_im2col<float>"``);
    ``block_sizes`` maps a kernel name (or name expression) to the block size
    it is launched with, for the occupancy column of the build check;
    ``dynamic_smem`` maps a kernel name (likewise) to the dynamic shared
    memory in bytes it is launched with (0 when absent).
    """

    filename: str
    name_expressions: tuple[str, ...]
    block_sizes: dict[str, int]
    options: tuple[str, ...] = COMPILE_OPTIONS
    dynamic_smem: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def path(self) -> Path:
        return CUDA_DIR / self.filename

    def code(self) -> str:
        return self.path.read_text()

    def block_size(self, name: str) -> int:
        """Launch block size of ``name`` (falls back to its template's name)."""
        if name in self.block_sizes:
            return self.block_sizes[name]
        return self.block_sizes[name.split("<", 1)[0]]


SOURCES: dict[str, CudaSource] = {}


def register(source: CudaSource) -> CudaSource:
    if source.filename in SOURCES:
        raise ValueError(f"CUDA source {source.filename!r} is registered twice")
    if not source.path.is_file():
        raise FileNotFoundError(f"CUDA source {source.path} does not exist")
    SOURCES[source.filename] = source
    return source


def load_all() -> dict[str, CudaSource]:
    """Import every op wrapper (each registers its source) and return them all."""
    import kernels.ops  # noqa: F401  (each op module registers its source)

    return SOURCES
