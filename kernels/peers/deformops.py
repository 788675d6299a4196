"""deformops 3.0.1 (PyPI, MIT): ``ms_deform_attn``, ``deform_conv2d`` and
``modulated_deform_conv2d`` on each of its backends (eager, triton, cuda).

Its documented surface, all these adapters use (``deformops.registry``):

- ``msda(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights, /, *, softmax=False, backend=Backend.X)``: the contract's
  tensors and layouts exactly (Deformable DETR's), ``softmax`` fused in the
  kernel; returns [N, Lq, M·D].
- ``conv(value, offset, weight, /, bias=None, mask=None, stride, padding,
  dilation, *, groups, offset_groups, backend=Backend.X)``: torchvision's
  ``deform_conv2d`` over *channels-last* operands: value [N, H, W, C_in],
  offset [N, H_out, W_out, offset_groups, K, 2] as (dy, dx) with the points
  row-major, mask [N, H_out, W_out, offset_groups, K]; returns
  [N, H_out, W_out, C_out]. Its ``Backend.CUDA`` runs the Triton kernel.
- ``Backend``: a StrEnum with CUDA, TRITON, EAGER.

The conv adapters convert the contract's NCHW tensors (torchvision's layout)
to those once, in prepare, where autograd records the permutes so gradients
land on the case's tensors; the timed call is the package's call plus a
permute view of its output back to NCHW (no copy).

deformops needs Python >= 3.12 and torch >= 2.11: it imports on the GPU image
only (its wheel travels with ``scripts/gpu-check.sh``); ``available`` says so
elsewhere. It computes float16 / bfloat16 natively on its triton and cuda
backends (its docs: they "take float16, bfloat16 and float32"); eager runs
PyTorch ops in the dtype.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import sys
from collections.abc import Callable

import torch

from kernels.reference.ms_deform_attn import check_arguments

DISTRIBUTION = "deformops"
BACKENDS = ("eager", "triton", "cuda")
# Where each backend runs (eager also on the CPU).
BACKEND_DEVICES = {"eager": ("cpu", "cuda"), "triton": ("cuda",), "cuda": ("cuda",)}
PRECISION = {"eager": "native (PyTorch ops in the dtype)", "triton": "native",
             "cuda": "native"}


def _registry():
    return importlib.import_module("deformops.registry")


def available(device: str) -> str | None:
    """None when deformops imports here, else why not (Python < 3.12 on our CI image)."""
    try:
        _registry()
    except (ImportError, OSError, SyntaxError) as error:
        python = ".".join(map(str, sys.version_info[:2]))
        return (f"deformops is not importable here ({type(error).__name__}: {error}); it needs "
                f"Python >= 3.12 and torch >= 2.11 (here Python {python}, torch "
                f"{torch.__version__}): the GPU image has it, via scripts/gpu-check.sh")
    return None


@functools.cache
def metadata() -> dict:
    """Version of the importable package, for the run's metadata ({} when absent)."""
    if available("cpu") is not None:
        return {}
    module = importlib.import_module("deformops")
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # imported from a path, not installed
        version = getattr(module, "__version__", None)
    return {"version": version, "backends": list(BACKENDS)}


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return getattr(_registry().Backend, name.upper())


def prepare_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
    backend: str,
) -> Callable[[], torch.Tensor]:
    """The contract's checks once; the call is ``deformops.registry.msda`` on ``backend``.
    Tensors as ``kernels.reference.ms_deform_attn.ms_deform_attn``; returns [N, Lq, M·D]."""
    check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights)
    return functools.partial(_registry().msda, value, spatial_shapes, level_start_index,
                             sampling_locations, attention_weights, softmax=bool(softmax),
                             backend=_backend(backend))


def prepare_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    offset_groups: int,
    backend: str,
) -> Callable[[], torch.Tensor]:
    """DCNv1 (``mask`` None) or DCNv2 by ``deformops.registry.conv`` on ``backend``.

    input [N, C_in, H, W], offset [N, 2·offset_groups·K, H_out, W_out] (channel
    2·(g·K + k) dy, + 1 dx), mask [N, offset_groups·K, H_out, W_out], weight
    [C_out, C_in/groups, kh, kw], bias [C_out] or None: torchvision's layout.
    Returns [N, C_out, H_out, W_out] (a view of the package's channels-last output).
    """
    tensors = {"input": input, "offset": offset, "weight": weight}
    if mask is not None:
        tensors["mask"] = mask
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor!r}")
    batch, _, out_h, out_w = offset.shape
    taps = weight.shape[2] * weight.shape[3]
    if offset.shape[1] != 2 * offset_groups * taps:
        raise ValueError(f"offset must have 2·offset_groups·K = {2 * offset_groups * taps} "
                         f"channels, got {offset.shape[1]}")
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * taps, out_h, out_w):
        raise ValueError(f"mask must be [N, offset_groups·K, H_out, W_out] = "
                         f"{[batch, offset_groups * taps, out_h, out_w]}, got {list(mask.shape)}")
    value = input.permute(0, 2, 3, 1).contiguous()
    # [N, og·K·2, Ho, Wo] -> [N, Ho, Wo, og, K, 2]: (dy, dx) pairs stay in order.
    points = offset.view(batch, offset_groups, taps, 2, out_h, out_w).permute(0, 4, 5, 1, 2, 3)
    modulation = (None if mask is None else
                  mask.view(batch, offset_groups, taps, out_h, out_w).permute(0, 3, 4, 1, 2).contiguous())
    conv = functools.partial(_registry().conv, value, points.contiguous(), weight, bias=bias,
                             mask=modulation, stride=stride, padding=padding, dilation=dilation,
                             groups=groups, offset_groups=offset_groups, backend=_backend(backend))
    return lambda: conv().permute(0, 3, 1, 2)
