"""``ms_deform_attn`` by torch-ms-deform-attn (PyPI, Apache-2.0): Deformable DETR's
CPU / CUDA / MPS extension, packaged.

Its ``ms_deform_attn(value, spatial_shapes, level_start_index,
sampling_locations, attention_weights, im2col_step)`` is the contract's
operator with the weights as given: the layouts are the contract's (Deformable
DETR's), so the adapter converts nothing. ``softmax`` = true runs
``torch.softmax`` over the L·P weights before the call, as Deformable DETR's
module does: the package has no fused softmax, and that softmax is part of
what a user of the package pays for.

Precision: float32 and float64 natively; float16 / bfloat16 inputs are
*upcast* to float32 inside the package and the output cast back (its README:
"Explicit .half() / .bfloat16() inputs compute in float32"). CPU builds need
a C++ compiler and ~65 s on 2 cores (``nox -s peers``); the CUDA backward is
nondeterministic (float atomics).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.reference.ms_deform_attn import check_arguments

DISTRIBUTION = "torch-ms-deform-attn"
MODULE = "torch_ms_deform_attn"
# Its CUDA chunking of the batch; irrelevant on the CPU.
IM2COL_STEP = 64
# How it computes each dtype (the peers page's "native or upcast" column).
PRECISION = {"float64": "native", "float32": "native", "float16": "upcast to float32",
             "bfloat16": "upcast to float32"}


def available(device: str) -> str | None:
    """None when the package imports (and, on CUDA, was built with CUDA kernels), else why not."""
    try:
        importlib.import_module(MODULE)
    except (ImportError, OSError) as error:
        return (f"{MODULE} is not importable ({error}); build it with `nox -s peers` or "
                f"`pip install --no-build-isolation {DISTRIBUTION}==0.1.1`")
    if device == "cuda" and not metadata().get("cuda_kernels"):
        return f"{MODULE} was built without CUDA kernels (no GPU or toolkit at build time)"
    return None


@functools.cache
def metadata() -> dict:
    """Version and build of the installed package, for the run's metadata ({} when absent)."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
        module = importlib.import_module(MODULE)
    except (ImportError, OSError, importlib.metadata.PackageNotFoundError):
        return {}
    extension = Path(module._C.__file__)
    # A CUDA build links kernels launched through the runtime; a CPU build has none.
    return {"version": version, "extension": extension.name,
            "cuda_kernels": b"cudaLaunchKernel" in extension.read_bytes()}


def prepare_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
) -> Callable[[], torch.Tensor]:
    """Check the arguments as the contract says (the tensors of
    ``kernels.reference.ms_deform_attn.ms_deform_attn``) once; the returned call
    runs the package on them ([N, Lq, M·D])."""
    check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights)
    package = importlib.import_module(MODULE)

    def call() -> torch.Tensor:
        weights = attention_weights
        if softmax:
            weights = torch.softmax(weights.flatten(3), dim=-1).view_as(attention_weights)
        return package.ms_deform_attn(value, spatial_shapes, level_start_index,
                                      sampling_locations, weights, IM2COL_STEP)

    return call
