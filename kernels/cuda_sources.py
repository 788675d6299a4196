"""Every CUDA source in ``kernels/cuda/``, with how it is compiled and launched.

One ``CudaSource`` per ``.cu`` file. The op wrappers build their modules from
it (``kernels.launch.module(SOURCE)``), and ``dcnbench kernels`` compiles the
very same source with the very same options and template instantiations, so
the build check sees exactly what the GPU path runs. A ``.cu`` file without a
registration here is an error in the build check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
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
        """The source CuPy compiles: the ``.cu`` text, then a comment with a hash of
        every header it includes. CuPy keys its on-disk kernel cache by the source
        text and the options alone, so an edited header must change the text."""
        digest = hashlib.sha256()
        for header in included_headers(self.path, self.include_dirs):
            digest.update(f"{header.name}\0".encode() + header.read_bytes())
        return f"{self.path.read_text()}\n// included headers: sha256 {digest.hexdigest()}\n"

    @property
    def include_dirs(self) -> tuple[Path, ...]:
        """The ``-I`` directories of the options."""
        return tuple(Path(option[2:]) for option in self.options if option.startswith("-I"))

    def block_size(self, name: str) -> int:
        """Launch block size of ``name`` (falls back to its template's name)."""
        if name in self.block_sizes:
            return self.block_sizes[name]
        return self.block_sizes[name.split("<", 1)[0]]


_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def included_headers(path: Path, include_dirs: tuple[Path, ...]) -> list[Path]:
    """Every header ``path`` includes with quotes, recursively, in first-include
    order; each found beside the including file, else in ``include_dirs`` (as
    NVRTC looks). System headers (``<...>``) belong to the toolkit, whose
    version CuPy's cache key holds already."""
    found: dict[Path, None] = {}
    pending = [path]
    while pending:
        including = pending.pop(0)
        for name in _QUOTED_INCLUDE.findall(including.read_text()):
            candidates = [including.parent / name, *(d / name for d in include_dirs)]
            header = next((c.resolve() for c in candidates if c.is_file()), None)
            if header is None:
                raise FileNotFoundError(f"{including}: included header {name!r} not found in "
                                        f"{', '.join(str(c.parent) for c in candidates)}")
            if header not in found:
                found[header] = None
                pending.append(header)
    return list(found)


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
