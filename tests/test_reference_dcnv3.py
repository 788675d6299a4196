"""The dcnv3 / dcnv4 reference, checked independently of itself.

Against the grid_sample formulation (another derivation of the contract) in
float64 over many random geometries, forward and gradients; on tiny examples
worked out by hand from the contract (tap order, x before y, remove_center,
offset_scale, half_w, B0's edges); dcnv4 against dcnv3; the chunking; and
the argument checks.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.peers import dcnv3_gridsample
from kernels.reference import dcnv3 as ref
from kernels.reference.dcnv3 import Geometry, offset_mask_channels, unpack_offset_mask

F64 = torch.float64


def random_case(seed: int):
    """A random geometry and float64 tensors for it; offsets reach outside the map."""
    rng = random.Random(seed)
    kernel_h, kernel_w = rng.choice([(1, 1), (3, 3), (5, 5), (3, 5), (2, 3), (4, 1)])
    remove_center = kernel_h % 2 == 1 and kernel_w % 2 == 1 and kernel_h * kernel_w > 1 and rng.random() < 0.5
    args = dict(
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=rng.choice([1, 2]), stride_w=rng.choice([1, 2, 3]),
        pad_h=rng.randint(0, 2), pad_w=rng.randint(0, 3), dilation_h=rng.choice([1, 2]),
        dilation_w=rng.choice([1, 3]), group=rng.choice([1, 2, 3]), group_channels=rng.choice([1, 3, 4]),
        offset_scale=rng.choice([1.0, 0.5, 2.0, 1.3]), remove_center=remove_center,
    )
    geometry = Geometry.from_params(args)
    height, width = rng.randint(5, 9), rng.randint(4, 10)
    out_h, out_w = geometry.output_size(height, width)
    if out_h < 1 or out_w < 1:
        return random_case(seed + 1000)
    generator = torch.Generator().manual_seed(seed)
    g, p, d = args["group"], geometry.taps, args["group_channels"]
    tensors = {
        "input": torch.randn(2, height, width, g * d, generator=generator, dtype=F64),
        "offset": 2.5 * torch.randn(2, out_h, out_w, g * p * 2, generator=generator, dtype=F64),
        "mask": torch.randn(2, out_h, out_w, g * p, generator=generator, dtype=F64),
    }
    return args, tensors


def outputs_and_gradients(function, tensors, args, softmax):
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    out = function(*leaves, **args, softmax=softmax)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    return [out, *torch.autograd.grad(out, leaves, grad_output)]


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_reference_equals_grid_sample_formulation_in_float64(seed, softmax):
    args, tensors = random_case(seed)
    got = outputs_and_gradients(ref.dcnv3, tensors, args, softmax)
    expected = outputs_and_gradients(dcnv3_gridsample.dcnv3, tensors, args, softmax)
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, expected, strict=True):
        scale = b.abs().max().clamp_min(1e-300)
        assert (a - b).abs().max() / scale < 1e-12, (name, args)
    assert got[0].abs().max() > 0.1  # a case that samples something


# --- tiny examples by hand ------------------------------------------------------

def one_channel(height=5, width=6):
    """[1, H, W, 1] with value 10·y + x at pixel (y, x): every pixel tells where it is."""
    y = torch.arange(height, dtype=F64)[:, None]
    x = torch.arange(width, dtype=F64)[None, :]
    return (10 * y + x)[None, :, :, None]


def single_tap(input, tap, dx=0.0, dy=0.0, **geometry):
    """dcnv3 with one group, mask 1 on ``tap`` and 0 elsewhere, the same (dx, dy) for every tap."""
    geometry = {"kernel_h": 3, "kernel_w": 3, **geometry}
    shape = Geometry.from_params({**Geometry().__dict__, **geometry})
    out_h, out_w = shape.output_size(*input.shape[1:3])
    offset = torch.tensor([dx, dy], dtype=F64).repeat(1, out_h, out_w, shape.taps)
    mask = torch.zeros(1, out_h, out_w, shape.taps, dtype=F64)
    mask[..., tap] = 1
    return ref.dcnv3(input, offset, mask, group=1, group_channels=1, **geometry)[0, :, :, 0]


def test_taps_run_column_major():
    """Tap p = i·kernel_h + j: tap 1 is (i=0, j=1), one column left of centre, same row."""
    out = single_tap(one_channel(), tap=1)
    assert out[2, 3] == 10 * 2 + 2  # (y, x) = (2, 3 - 1), not (2 - 1, 3) as row-major would read
    assert single_tap(one_channel(), tap=3)[2, 3] == 10 * 1 + 3  # (i=1, j=0): row above


def test_offsets_are_x_then_y():
    out = single_tap(one_channel(), tap=4, dx=1.0, dy=0.0)  # centre tap moved one pixel right
    assert out[2, 3] == 10 * 2 + 4


def test_remove_center_skips_the_centre_tap():
    """With remove_center, P = 8 and tap 4 is the former tap 5: (i=1, j=2), the row below."""
    out = single_tap(one_channel(), tap=4, remove_center=True)
    assert out[2, 3] == 10 * 3 + 3
    assert single_tap(one_channel(), tap=3, remove_center=True)[2, 3] == 10 * 1 + 3  # (i=1, j=0)


def test_offset_scale_multiplies_tap_and_offset():
    # tap 0 = (i=0, j=0): x = wo + (-1 + dx)·scale, y = ho + (-1 + dy)·scale
    assert single_tap(one_channel(6, 7), tap=0, offset_scale=2.0)[3, 4] == 10 * 1 + 2
    assert single_tap(one_channel(6, 7), tap=0, dx=0.5, dy=1.5, offset_scale=2.0)[3, 4] == 10 * 4 + 3


def test_half_w_formula_on_an_even_kernel():
    """kernel_w = 4, pad 0: half_w = 3 // 2 = 1 and x = wo − 0 + 1 + (i − 1) = wo + i."""
    geometry = {"kernel_h": 1, "kernel_w": 4, "pad_h": 0, "pad_w": 0}
    for tap in range(4):
        out = single_tap(one_channel(), tap=tap, **geometry)
        assert out.shape == (5, 3)
        assert out[1, 0] == 10 * 1 + tap
    dilated = single_tap(one_channel(5, 9), tap=3, kernel_h=1, kernel_w=4, pad_h=0, pad_w=0, dilation_w=2)
    # half_w = (2·3) // 2 = 3: x = wo + 3 + (3·2 − 3) = wo + 6
    assert dilated[0, 0] == 6


@pytest.mark.parametrize("dx, expected", [
    (-2.0, 0.0), (-1.0, 0.0), (-0.5, 0.5 * 20), (0.0, 20.0), (0.25, 0.75 * 20 + 0.25 * 21),
    (5.0, 25.0), (5.5, 0.5 * 25), (6.0, 0.0), (7.0, 0.0),
])
def test_b0_at_and_past_the_edges(dx, expected):
    """Centre tap at (y, x) = (2, 0 + dx) on a 6-wide map: B0, zero outside, corners outside count 0."""
    out = single_tap(one_channel(), tap=4, dx=dx)
    assert out[2, 0] == pytest.approx(expected, abs=1e-12)


def test_bilinear_blend_inside():
    out = single_tap(one_channel(), tap=4, dx=0.25, dy=0.5)
    v = one_channel()[0, :, :, 0]
    expected = 0.5 * (0.75 * v[2, 3] + 0.25 * v[2, 4]) + 0.5 * (0.75 * v[3, 3] + 0.25 * v[3, 4])
    assert out[2, 3] == pytest.approx(float(expected), abs=1e-12)


def test_groups_use_their_own_channels_offsets_and_masks():
    """Group 1's offset and mask move group 1's channels only."""
    input = torch.cat([one_channel(), 100 + one_channel()], dim=-1)  # 2 groups of 1 channel
    offset = torch.zeros(1, 5, 6, 2 * 9 * 2, dtype=F64)
    offset[..., 9 * 2 + 2 * 4] = 1.0  # group 1, centre tap, dx = 1
    mask = torch.zeros(1, 5, 6, 2 * 9, dtype=F64)
    mask[..., 4] = mask[..., 9 + 4] = 1
    out = ref.dcnv3(input, offset, mask, group=2, group_channels=1)
    assert out[0, 2, 3, 0] == 23 and out[0, 2, 3, 1] == 124


def test_softmax_is_the_per_group_softmax_of_the_mask():
    args, tensors = random_case(3)
    g, p = args["group"], Geometry.from_params(args).taps
    mask = tensors["mask"]
    normalised = torch.softmax(mask.view(*mask.shape[:3], g, p), -1).reshape(mask.shape)
    fused = ref.dcnv3(tensors["input"], tensors["offset"], mask, **args, softmax=True)
    explicit = ref.dcnv3(tensors["input"], tensors["offset"], normalised, **args)
    torch.testing.assert_close(fused, explicit, rtol=1e-13, atol=1e-13)


# --- dcnv4 ----------------------------------------------------------------------

def test_offset_mask_channels_rounds_up_to_eight():
    assert [offset_mask_channels(g, p) for g, p in [(1, 9), (4, 9), (1, 8), (3, 25), (2, 4)]] == [32, 112, 24, 232, 24]


def pack(offset, mask, group, taps, garbage):
    """offset_mask as the contract lays it out, spelled with explicit indices."""
    batch, out_h, out_w, _ = offset.shape
    packed = torch.full((batch, out_h, out_w, offset_mask_channels(group, taps)), garbage, dtype=F64)
    for g in range(group):
        for p in range(taps):
            packed[..., g * 3 * taps + 2 * p] = offset[..., g * taps * 2 + 2 * p]
            packed[..., g * 3 * taps + 2 * p + 1] = offset[..., g * taps * 2 + 2 * p + 1]
            packed[..., g * 3 * taps + 2 * taps + p] = mask[..., g * taps + p]
    return packed


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_dcnv4_is_dcnv3_on_the_unpacked_tensors_and_ignores_padding(seed):
    args, tensors = random_case(seed)
    group, taps = args["group"], Geometry.from_params(args).taps
    expected = ref.dcnv3(**tensors, **args)
    for garbage in (0.0, 1e4):
        offset_mask = pack(tensors["offset"], tensors["mask"], group, taps, garbage).requires_grad_()
        got = ref.dcnv4(tensors["input"], offset_mask, **args)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(got.sum(), offset_mask)
        assert torch.equal(grad[..., group * 3 * taps:], torch.zeros_like(grad[..., group * 3 * taps:]))
    offset, mask = unpack_offset_mask(offset_mask.detach(), group, taps)
    assert torch.equal(offset, tensors["offset"]) and torch.equal(mask, tensors["mask"])


# --- chunking -------------------------------------------------------------------

def test_chunks_of_images_and_of_taps_give_the_same_result(monkeypatch):
    args = dict(kernel_h=3, kernel_w=5, pad_h=1, pad_w=2, group=2, group_channels=3, offset_scale=0.5)
    generator = torch.Generator().manual_seed(4)
    tensors = {"input": torch.randn(3, 6, 7, 6, generator=generator, dtype=F64),
               "offset": 2 * torch.randn(3, 6, 7, 2 * 15 * 2, generator=generator, dtype=F64),
               "mask": torch.randn(3, 6, 7, 2 * 15, generator=generator, dtype=F64)}
    whole = outputs_and_gradients(ref.dcnv3, tensors, args, softmax=True)
    per_tap = 6 * 7 * 6  # sampled values of one image and one tap
    for limit in (2 * 15 * per_tap, 15 * per_tap, 4 * per_tap):  # 2 images; 1 image; 4 taps
        monkeypatch.setattr(ref, "MAX_CHUNK_ELEMENTS", limit)
        chunked = outputs_and_gradients(ref.dcnv3, tensors, args, softmax=True)
        for a, b in zip(chunked, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- argument checks ------------------------------------------------------------

def good_arguments():
    return {"input": torch.randn(2, 5, 6, 8, dtype=F64), "offset": torch.randn(2, 5, 6, 2 * 9 * 2, dtype=F64),
            "mask": torch.randn(2, 5, 6, 2 * 9, dtype=F64)}


@pytest.mark.parametrize("change, words", [
    (lambda a: {**a, "input": torch.randn(2, 5, 6, 7, dtype=F64)},
     ["input", "group·group_channels = 2·4 = 8", "(2, 5, 6, 7)"]),
    (lambda a: {**a, "offset": torch.randn(2, 5, 6, 35, dtype=F64)},
     ["offset", "[N, H_out, W_out, 36] = (2, 5, 6, 36)", "(2, 5, 6, 35)"]),
    (lambda a: {**a, "mask": torch.randn(2, 5, 6, 9, dtype=F64)},
     ["mask", "(2, 5, 6, 18)", "(2, 5, 6, 9)"]),
    (lambda a: {**a, "input": torch.randn(0, 5, 6, 7, dtype=F64)},
     ["input", "group·group_channels = 2·4 = 8", "(0, 5, 6, 7)"]),
    (lambda a: {**a, "mask": a["mask"].float()}, ["mask", "torch.float64", "torch.float32"]),
    (lambda a: {**a, "offset": a["offset"].to("meta")}, ["offset", "on cpu", "on meta"]),
])
def test_bad_arguments_name_the_tensor_expected_and_actual(change, words):
    with pytest.raises(ValueError) as error:
        ref.dcnv3(**change(good_arguments()), group=2, group_channels=4)
    for word in words:
        assert word in str(error.value)


def test_bad_offset_mask_names_its_shape():
    with pytest.raises(ValueError, match=r"offset_mask must have at least group·3·P = 2·3·9 = 54"):
        ref.dcnv4(torch.randn(2, 5, 6, 8, dtype=F64), torch.randn(2, 5, 6, 53, dtype=F64),
                  group=2, group_channels=4)
    with pytest.raises(ValueError, match=r"offset_mask must have shape \[N, H_out, W_out, 54\]"):
        ref.dcnv4(torch.randn(2, 5, 6, 8, dtype=F64), torch.randn(2, 5, 5, 54, dtype=F64),
                  group=2, group_channels=4)


@pytest.mark.parametrize("geometry, words", [
    ({"kernel_h": 2, "remove_center": True}, ["remove_center", "kernel_h=2"]),
    ({"kernel_h": 1, "kernel_w": 1, "pad_h": 0, "pad_w": 0, "remove_center": True}, ["remove_center"]),
    ({"stride_w": 0}, ["stride_w", ">= 1", "got 0"]),
    ({"pad_h": -1}, ["pad_h", ">= 0"]),
    ({"offset_scale": float("nan")}, ["offset_scale", "finite"]),
    ({"kernel_h": 9, "pad_h": 0}, ["output is empty", "H_out=-3"]),
])
def test_bad_geometry_is_refused_by_name(geometry, words):
    with pytest.raises(ValueError) as error:
        ref.dcnv3(**good_arguments(), group=2, group_channels=4, **geometry)
    for word in words:
        assert word in str(error.value)
