"""Our DCNv4 operator (``kernels.ops.dcnv4``): what is specific to the fused ``offset_mask``.

The kernels are ``kernels.ops.dcnv3``'s, instantiated for the fused layout;
``tests/test_dcnv3.py`` runs its whole forward/gradient matrix (both designs,
every dtype, every case, memcheck, opcheck, torch.compile, GPU) for ``dcnv4``
too. Here: the ``offset_mask`` shape checks, the padding columns (ignored,
zero gradient), and agreement with ``dcnv3`` on the unpacked tensors.
"""

from __future__ import annotations

import pytest
import torch
from test_dcnv3 import CASES, DTYPES, assert_close, dtype_id, make_inputs

from kernels.ops import dcnv3 as ops
from kernels.ops.dcnv4 import dcnv4
from kernels.reference import dcnv3 as reference

# Every kernel output starts as NaN: an unwritten element fails its comparison.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_padding_columns_are_ignored_and_get_zero_gradient(design, dtype):
    """Changing the padding columns changes nothing; their gradient is exactly 0."""
    case = CASES["basic_3x3"]  # G·P·3 = 54, M = 56: 2 padding columns
    inputs = make_inputs(case, "dcnv4", dtype)
    used = case.group * case.geometry.taps * 3
    assert inputs["offset_mask"].shape[-1] > used
    offset_mask = inputs["offset_mask"].clone().requires_grad_()
    out = dcnv4(inputs["input"], offset_mask, **case.params(), design=design)
    out.backward(torch.ones_like(out))
    assert torch.all(offset_mask.grad[..., used:] == 0)
    assert torch.isfinite(offset_mask.grad).all()
    changed = inputs["offset_mask"].clone()
    changed[..., used:] = float("nan")
    torch.testing.assert_close(
        dcnv4(inputs["input"], changed, **case.params(), design=design),
        out.detach(),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("design", ops.DESIGNS)
def test_matches_dcnv3_on_the_unpacked_tensors(design):
    """dcnv4 = dcnv3 (no softmax) on offset and mask unpacked from offset_mask:
    outputs equal, gradients equal once packed back."""
    case = CASES["3x5_stride2_dilation2_G3_D16"]
    inputs = make_inputs(case, "dcnv4", torch.float32)
    taps = case.geometry.taps
    offset_mask = inputs["offset_mask"].clone().requires_grad_()
    offset, mask = (
        t.detach().clone().requires_grad_()
        for t in reference.unpack_offset_mask(inputs["offset_mask"], case.group, taps)
    )
    v4 = dcnv4(inputs["input"], offset_mask, **case.params(), design=design)
    v3 = ops.dcnv3(inputs["input"], offset, mask, **case.params(), design=design)
    torch.testing.assert_close(v4, v3, rtol=0, atol=0)
    v4.sum().backward()
    v3.sum().backward()
    grad_offset, grad_mask = reference.unpack_offset_mask(offset_mask.grad, case.group, taps)
    torch.testing.assert_close(grad_offset, offset.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_mask, mask.grad, rtol=0, atol=0)


def test_against_reference_bfloat16_backward():
    """Upstream DCNv4's bfloat16 backward is broken; ours matches the reference."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv4", torch.bfloat16)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    refs = {n: t.double().requires_grad_() for n, t in inputs.items()}
    out = dcnv4(leaves["input"], leaves["offset_mask"], **case.params())
    expected = reference.dcnv4(refs["input"], refs["offset_mask"], **case.params())
    out.sum().backward()
    expected.sum().backward()
    for name in inputs:
        assert_close(f"grad_{name}", leaves[name].grad, refs[name].grad, torch.bfloat16)


BAD_OFFSET_MASK = {
    # G=2, P=9: G·P·3 = 54, M = 56.
    "too_narrow": (
        torch.zeros(2, 5, 6, 53),
        r"offset_mask must have at least group·3·P = 2·3·9 = 54 columns .*got shape \(2, 5, 6, 53\)",
    ),
    "dcnv3_offset": (torch.zeros(2, 5, 6, 36), r"offset_mask must have at least .* 54 columns"),
    "wrong_spatial_size": (
        torch.zeros(2, 6, 6, 56),
        r"offset_mask must have shape .*\(2, 5, 6, 56\)",
    ),
    "dtype": (torch.zeros(2, 5, 6, 56, dtype=torch.bfloat16), r"offset_mask must be torch.float32"),
}


@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("width", [54, 64, "strided"])
def test_offset_mask_of_any_width(width, design):
    """Any width >= G·3P (54 here; DCNv4 pads to 56), non-contiguous too: the
    same output and gradients as the padded offset_mask, zero gradient on the
    padding, here and in the reference."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv4", torch.float32, seed=7)
    used = 54
    if width == "strided":  # every other column of a twice-as-wide tensor
        wide = torch.zeros(*inputs["offset_mask"].shape[:3], 112)
        wide[..., ::2] = inputs["offset_mask"]
        other = wide[..., ::2]
    else:
        other = torch.nn.functional.pad(inputs["offset_mask"][..., :used], (0, width - used), value=7.0)
    outputs, grads = [], []
    for offset_mask in (inputs["offset_mask"], other):
        leaf = offset_mask.detach().clone().requires_grad_() if width != "strided" else offset_mask.requires_grad_()
        out = dcnv4(inputs["input"], leaf, **case.params(), design=design)
        out.backward(torch.ones_like(out))
        outputs.append(out)
        grads.append(leaf.grad)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0][..., :used], grads[1][..., :used])
    assert not grads[1][..., used:].any()
    assert torch.equal(
        reference.dcnv4(inputs["input"], other.detach(), **case.params()),
        reference.dcnv4(inputs["input"], inputs["offset_mask"], **case.params()),
    )


@pytest.mark.parametrize("name", list(BAD_OFFSET_MASK))
def test_bad_offset_mask(name):
    offset_mask, message = BAD_OFFSET_MASK[name]
    case = CASES["basic_3x3"]
    input = make_inputs(case, "dcnv4", torch.float32)["input"]
    with pytest.raises(ValueError, match=message):
        dcnv4(input, offset_mask, **case.params())


def test_bad_input_channels():
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv4", torch.float32)
    with pytest.raises(ValueError, match=r"input must have group·group_channels = 2·4 = 8"):
        dcnv4(inputs["input"], inputs["offset_mask"], **{**case.params(), "group_channels": 4})
