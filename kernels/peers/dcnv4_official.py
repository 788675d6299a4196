"""DCNv4 1.0.0.post2 (PyPI ``DCNv4``, the official package): ``dcnv4`` and
``ms_deform_attn`` (its ``flash_deform_attn``), exactly as released.

An sdist only, whose ``setup.py`` refuses to build without a visible GPU: it is
built on the GPU machine inside ``scripts/gpu-check.sh`` (its own step and
time limit). Its documented surface, these adapters use:

- ``DCNv4.functions.DCNv4Function.apply(input, offset_mask, kernel_h,
  kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
  group_channels, offset_scale, im2col_step, remove_center)``: the contract's
  ``dcnv4`` layouts (input [N, H, W, G·D], offset_mask [N, H_out, W_out,
  ceil(G·P·3/8)·8]) as they are. Upstream takes 3×3 kernels and D % 16 == 0
  only: other cases are its errors, recorded as such.
- ``DCNv4.functions.FlashDeformAttnFunction.apply(value, spatial_shapes,
  level_start_index, sampling_loc_attn, im2col_step, K)``: value and the level
  table as the contract's; ``sampling_loc_attn`` [N, Lq, M, L·P·3] holds, per
  head, the L·P (x, y) locations then the L·P attention logits, and the
  kernel *always* applies a softmax over them. So only ``softmax`` = true
  cases map onto it; the adapter refuses the others, naming why.

The released ``FlashDeformAttn`` module applies ``F.softmax`` to the logits
before that kernel, which applies it again (fixed upstream after the
release). The ``ms_deform_attn`` adapter computes what the released module
computes — ``F.softmax`` over the L·P logits, then the kernel — so the double
softmax shows up as a ``fail`` row with its error, not hidden or patched. (The
released module also calls the function with seven arguments, locations and
weights apart, where its ``forward`` takes six and one packed tensor; the
adapter packs them as the kernel reads them.)

Precision: half and bfloat16 storage with float32 arithmetic inside the
kernels ("native" on the peers page); the functions run under
``torch.autocast("cuda", dtype=float16)``, which changes no explicit dtype here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.reference.ms_deform_attn import check_arguments

DISTRIBUTION = "DCNv4"
IM2COL_STEP = 128  # the package's default in its modules
PRECISION = {"float32": "native", "float16": "native (float32 arithmetic)",
             "bfloat16": "native (float32 arithmetic)"}


def _functions():
    return importlib.import_module("DCNv4.functions")


def available(device: str) -> str | None:
    """None when the built package imports (CUDA only), else why not."""
    if device != "cuda":
        return "DCNv4 is CUDA-only (its setup.py refuses to build without a GPU)"
    try:
        _functions()
    except (ImportError, OSError, NotImplementedError, RuntimeError) as error:
        return (f"DCNv4 is not importable ({type(error).__name__}: {error}); scripts/gpu-check.sh "
                f"builds it from its sdist on the GPU machine")
    return None


@functools.cache
def metadata() -> dict:
    """Version of the installed package, for the run's metadata ({} when absent)."""
    try:
        return {"version": importlib.metadata.version(DISTRIBUTION),
                "build": "sdist, built with the GPU's CUDA toolkit (TORCH_CUDA_ARCH_LIST)"}
    except importlib.metadata.PackageNotFoundError:
        return {}


def prepare_dcnv4(input: torch.Tensor, offset_mask: torch.Tensor, *, kernel_h: int, kernel_w: int,
                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                  dilation_w: int, group: int, group_channels: int, offset_scale: float,
                  remove_center: bool) -> Callable[[], torch.Tensor]:
    """``DCNv4Function.apply`` on the contract's tensors ([N, H, W, G·D] and the fused
    offset_mask); returns [N, H_out, W_out, G·D]."""
    for name, tensor in (("input", input), ("offset_mask", offset_mask)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D channels-last tensor")
    function = _functions().DCNv4Function
    return functools.partial(function.apply, input, offset_mask, kernel_h, kernel_w, stride_h,
                             stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                             float(offset_scale), IM2COL_STEP, bool(remove_center))


def prepare_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool,
) -> Callable[[], torch.Tensor]:
    """The released ``FlashDeformAttn`` module's core: ``F.softmax`` of the logits, packed
    with the locations into ``sampling_loc_attn``, then ``FlashDeformAttnFunction``.
    Tensors as ``kernels.reference.ms_deform_attn.ms_deform_attn``; ``softmax`` must be true."""
    if not softmax:
        raise ValueError("softmax must be true for dcnv4_official: DCNv4's flash_deform_attn "
                         "kernel always applies a softmax to the attention weights, so the "
                         "contract's weights-as-given operator has no call on it")
    check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights)
    batch, queries, heads, levels, points, _ = sampling_locations.shape
    function = _functions().FlashDeformAttnFunction
    locations = sampling_locations.reshape(batch, queries, heads, levels * points * 2)

    def call() -> torch.Tensor:
        # As released: the module's softmax, then a kernel that applies its own.
        weights = F.softmax(attention_weights.reshape(batch, queries, heads, levels * points), -1)
        packed = torch.cat((locations, weights), dim=-1).contiguous()
        return function.apply(value, spatial_shapes, level_start_index, packed, IM2COL_STEP,
                              points)

    return call
