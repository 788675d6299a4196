"""The float64 reference of deform_conv2d / modulated_deform_conv2d (and conv2d).

Independent checks, none of which reads the reference's own code:

- torchvision.ops.deform_conv2d on the CPU in float64, forward and every
  gradient, over many configurations (samples drawn off B0's kinks: the
  contract keeps gradient checks off exact boundary points, where
  torchvision's offset gradient disagrees with its own forward);
- tiny examples computed by hand from the contract's B0 rule and tap layout;
- zero offsets reduce to torch.nn.functional.conv2d, a mask of ones to DCNv1.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

from kernels.reference.conv2d import conv2d, conv_output_size
from kernels.reference.deform_conv2d import deform_conv2d, modulated_deform_conv2d

# The registered float64 tolerance, spelled out so this file stays independent.
REL_L2_64 = 1e-12
MAX_ABS_64 = 1e-11


def assert_close(actual, expected, name, rel_l2=REL_L2_64, max_abs=MAX_ABS_64):
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max()) or 1.0
    diff = (actual - expected).abs()
    rel = float(torch.linalg.vector_norm(diff)) / (float(torch.linalg.vector_norm(expected)) or 1.0)
    assert rel <= rel_l2 and float(diff.max()) / scale <= max_abs, (
        f"{name}: rel_l2 {rel:.3g} (tol {rel_l2:.1g}), max_abs {float(diff.max()) / scale:.3g} "
        f"(tol {max_abs:.1g})"
    )


def pair(value):
    return value if isinstance(value, tuple) else (value, value)


# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, offset_groups, bias)
CONFIGS = [
    (2, 4, 6, 7, 8, (3, 3), 1, 1, 1, 1, 1, True),
    (1, 6, 4, 9, 7, (2, 3), (2, 1), (0, 2), (1, 2), 2, 3, True),
    (3, 8, 8, 5, 5, (3, 1), 1, (1, 0), 1, 4, 2, False),
    (1, 3, 3, 6, 6, (1, 1), 2, 0, 1, 3, 3, True),
    (2, 4, 2, 10, 4, (5, 5), 1, 2, 1, 2, 4, True),
    (1, 2, 4, 4, 11, (3, 2), (1, 3), (3, 1), (2, 1), 1, 2, False),
    (2, 8, 4, 6, 6, (3, 3), 2, 1, 2, 2, 1, True),
]


def random_config(seed: int):
    rng = random.Random(seed)
    groups, offset_groups = rng.choice([1, 2]), rng.choice([1, 2, 3])
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    height, width = rng.randint(kernel[0] * dilation[0], 9), rng.randint(kernel[1] * dilation[1], 9)
    return (rng.randint(1, 3), 6 * rng.randint(1, 2), groups * rng.randint(1, 3), height, width,
            kernel, (rng.randint(1, 2), rng.randint(1, 2)), (rng.randint(0, 2), rng.randint(0, 2)),
            dilation, groups, offset_groups, rng.random() < 0.7)


def make_case(config, seed):
    """float64 tensors for ``config``; offsets continuous (never on a kink), some samples outside."""
    n, c_in, c_out, h, w, (kh, kw), stride, padding, dilation, groups, offset_groups, bias = config
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out_h = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "input": torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64),
        "offset": 2 * torch.randn(n, 2 * offset_groups * kh * kw, out_h, out_w, generator=gen, dtype=torch.float64),
        "mask": torch.rand(n, offset_groups * kh * kw, out_h, out_w, generator=gen, dtype=torch.float64),
        "weight": torch.randn(c_out, c_in // groups, kh, kw, generator=gen, dtype=torch.float64),
        "bias": torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None,
    }
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    return tensors, geometry, {"groups": groups, "offset_groups": offset_groups}


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("config", CONFIGS + [random_config(seed) for seed in range(12)])
def test_matches_torchvision_forward_and_gradients(config, modulated):
    tensors, geometry, groups = make_case(config, seed=hash(config) % 2**31)
    names = [k for k in ("input", "offset", "mask", "weight", "bias")
             if tensors[k] is not None and (modulated or k != "mask")]
    leaves = {k: tensors[k].clone().requires_grad_() for k in names}
    peer_leaves = {k: tensors[k].clone().requires_grad_() for k in names}
    bias = leaves.get("bias")
    if modulated:
        ours = modulated_deform_conv2d(leaves["input"], leaves["offset"], leaves["mask"],
                                       leaves["weight"], bias, **geometry, **groups)
    else:
        ours = deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], bias,
                             **geometry, **groups)
    theirs = torchvision.ops.deform_conv2d(
        peer_leaves["input"], peer_leaves["offset"], peer_leaves["weight"], peer_leaves.get("bias"),
        mask=peer_leaves.get("mask"), **geometry)
    assert_close(ours, theirs, "output")

    grad_output = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    our_grads = torch.autograd.grad(ours, [leaves[k] for k in names], grad_output)
    their_grads = torch.autograd.grad(theirs, [peer_leaves[k] for k in names], grad_output)
    for name, mine, peer in zip(names, our_grads, their_grads, strict=True):
        assert_close(mine, peer, f"grad_{name}")


# --- B0 by hand ---------------------------------------------------------------

# A 3x4 map whose pixel (r, c) holds 10·r + c + 1: every value distinct, none zero.
MAP = torch.tensor([[1.0, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23, 24]], dtype=torch.float64)

# (y, x, value by B0) worked out by hand from the contract's rule, H = 3, W = 4.
B0_EXAMPLES = [
    (-1.0, 1.0, 0.0),  # y <= -1: zero
    (-0.5, 1.0, 0.5 * 2),  # row -1 is outside: half of pixel (0, 1)
    (0.0, 1.0, 2.0),  # exactly on row 0
    (2.0, 1.0, 22.0),  # exactly on row H-1
    (2.25, 1.0, 0.75 * 22),  # between H-1 and H: row H is outside
    (3.0, 1.0, 0.0),  # y >= H: zero
    (3.5, 1.0, 0.0),
    (1.0, -1.0, 0.0),  # x <= -1
    (0.0, 3.0, 4.0),  # exactly on column W-1
    (1.0, 3.5, 0.5 * 14),  # between W-1 and W
    (1.0, 4.0, 0.0),  # x >= W
    (0.5, 1.5, (2 + 3 + 12 + 13) / 4),  # interior: mean of four pixels
    (-0.5, -0.5, 0.25 * 1),  # outside corner: one quarter of pixel (0, 0)
    (2.5, 3.5, 0.25 * 24),  # far corner
    (-0.75, 0.25, 0.25 * (0.75 * 1 + 0.25 * 2)),
]


def test_b0_by_hand():
    height, width = MAP.shape
    points = [(y, x) for y, x, _ in B0_EXAMPLES]
    # A 1x1 kernel of weight 1 with stride (H, W) has one output pixel whose
    # base position is (0, 0): its value is B0(MAP, dy, dx).
    values = []
    for y, x in points:
        offset = torch.tensor([y, x], dtype=torch.float64).view(1, 2, 1, 1)
        out = deform_conv2d(MAP.view(1, 1, height, width), offset,
                            torch.ones(1, 1, 1, 1, dtype=torch.float64),
                            padding=(0, 0), stride=(height, width))
        values.append(float(out))
    expected = [value for _, _, value in B0_EXAMPLES]
    assert values == pytest.approx(expected, abs=1e-12), list(zip(points, values, expected, strict=True))


def test_b0_gradients_by_hand():
    """d/dy and d/dx of B0 between pixels, also where one corner pair is outside."""
    height, width = MAP.shape
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    cases = [
        # interior: rows blend 0.75·(col 1) + 0.25·(col 2); columns 0.5/0.5
        ((0.5, 1.25), (0.75 * 12 + 0.25 * 13 - (0.75 * 2 + 0.25 * 3), 0.5 * (3 - 2) + 0.5 * (13 - 12))),
        # row H is outside: value 0.5·(0.75·22 + 0.25·23)
        ((2.5, 1.25), (-(0.75 * 22 + 0.25 * 23), 0.5 * (23 - 22))),
        # column -1 is outside: value 0.5·(0.75·1 + 0.25·11)
        ((0.25, -0.5), (0.5 * (11 - 1), 0.75 * 1 + 0.25 * 11)),
        # column W is outside: value 0.5·(0.5·14 + 0.5·24)
        ((1.5, 3.5), (0.5 * (24 - 14), -(0.5 * 14 + 0.5 * 24))),
    ]
    for (y, x), expected in cases:
        offset = torch.tensor([y, x], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_()
        out = deform_conv2d(MAP.view(1, 1, height, width), offset, weight, stride=(height, width))
        (grad,) = torch.autograd.grad(out.sum(), offset)
        assert grad.flatten().tolist() == pytest.approx(expected, abs=1e-12), (y, x)


def test_gradient_at_y_minus_one_follows_the_forward():
    """At y = -1 exactly B0's first clause says "outside": the value is 0 on the
    left and the reference's d/dy there is the left one, 0 (the contract leaves
    kinks to the reference; torchvision's backward takes the right one)."""
    height, width = MAP.shape
    offset = torch.tensor([-1.0, 1.25], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_()
    out = deform_conv2d(MAP.view(1, 1, height, width), offset,
                        torch.ones(1, 1, 1, 1, dtype=torch.float64), stride=(height, width))
    (grad,) = torch.autograd.grad(out.sum(), offset)
    assert float(out.detach()) == 0.0 and grad.flatten().tolist() == [0.0, 0.0]


def test_tap_order_offset_layout_and_offset_groups_by_hand():
    """Tap k = i·kw + j; channel 2·(g·kh·kw + k) is dy, the next dx; mask g·kh·kw + k;
    input channel c uses offset group c // (C_in/offset_groups)."""
    # Four channels, 10^c · MAP: channels 0, 1 are offset group 0, channels 2, 3 group 1.
    image = torch.stack([10.0**c * MAP for c in range(4)]).unsqueeze(0)  # [1, 4, 3, 4]
    kh, kw, groups_of_offsets = 2, 2, 2
    # 2x2 kernel on a 3x4 map, no padding: H_out = 2, W_out = 3. Look at output (0, 0).
    offset = torch.zeros(1, 2 * groups_of_offsets * kh * kw, 2, 3, dtype=torch.float64)
    # Group 0, tap k = 1 (i=0, j=1, base (0, 1)): dy = +1 -> samples (1, 1), MAP value 12.
    offset[0, 2 * (0 * 4 + 1), 0, 0] = 1.0
    # Group 1, tap k = 2 (i=1, j=0, base (1, 0)): dx = +2 -> samples (1, 2), MAP value 13.
    offset[0, 2 * (1 * 4 + 2) + 1, 0, 0] = 2.0
    weight = torch.zeros(1, 4, kh, kw, dtype=torch.float64)
    weight[0, 1, 0, 1] = 1.0  # channel 1 (group 0), tap (0, 1)
    weight[0, 2, 1, 0] = 1.0  # channel 2 (group 1), tap (1, 0)
    out = deform_conv2d(image, offset, weight, offset_groups=groups_of_offsets)
    assert float(out[0, 0, 0, 0]) == 10 * 12.0 + 100 * 13.0

    mask = torch.ones(1, groups_of_offsets * kh * kw, 2, 3, dtype=torch.float64)
    mask[0, 0 * 4 + 1, 0, 0] = 0.5  # group 0, tap 1
    mask[0, 1 * 4 + 2, 0, 0] = 0.25  # group 1, tap 2
    mask[0, 0 * 4 + 2, 0, 0] = 0.0  # group 0, tap 2: its weights are 0 anyway
    out = modulated_deform_conv2d(image, offset, mask, weight, offset_groups=groups_of_offsets)
    assert float(out[0, 0, 0, 0]) == 0.5 * 10 * 12.0 + 0.25 * 100 * 13.0


# --- reductions to known operators ---------------------------------------------

@pytest.mark.parametrize("config", CONFIGS[:4])
def test_zero_offsets_are_conv2d(config):
    tensors, geometry, groups = make_case(config, seed=3)
    zero = torch.zeros_like(tensors["offset"])
    ours = deform_conv2d(tensors["input"], zero, tensors["weight"], tensors["bias"], **geometry, **groups)
    dense = F.conv2d(tensors["input"], tensors["weight"], tensors["bias"], groups=groups["groups"], **geometry)
    assert_close(ours, dense, "output")
    assert_close(conv2d(tensors["input"], tensors["weight"], tensors["bias"], groups=groups["groups"], **geometry),
                 dense, "conv2d reference")


def test_mask_of_ones_is_dcn_v1():
    tensors, geometry, groups = make_case(CONFIGS[1], seed=4)
    ones = torch.ones_like(tensors["mask"])
    v2 = modulated_deform_conv2d(tensors["input"], tensors["offset"], ones, tensors["weight"],
                                 tensors["bias"], **geometry, **groups)
    v1 = deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                       **geometry, **groups)
    assert torch.equal(v1, v2)


# --- chunking and argument checks ----------------------------------------------

def test_chunking_changes_nothing(monkeypatch):
    """Chunks of images and of taps give the same output and gradients as one chunk."""
    tensors, geometry, groups = make_case(CONFIGS[0], seed=5)
    names = ["input", "offset", "mask", "weight", "bias"]

    def run():
        leaves = [tensors[k].clone().requires_grad_() for k in names]
        out = modulated_deform_conv2d(*leaves[:4], leaves[4], **geometry, **groups)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    whole = run()
    module = sys.modules["kernels.reference.deform_conv2d"]
    c_in, taps, pixels = 4, 9, 7 * 8
    monkeypatch.setattr(module, "MAX_CHUNK_ELEMENTS", 2 * c_in * pixels)  # 2 taps of 1 image
    assert c_in * taps * pixels > module.MAX_CHUNK_ELEMENTS
    chunked = run()
    for name, a, b in zip(["output", *names], chunked, whole, strict=True):
        assert_close(a, b, name)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, k: t.update(offset=t["offset"][:, :-2]), "offset must have shape"),
        (lambda t, k: t.update(mask=t["mask"][:, :, :-1]), "mask must have shape"),
        (lambda t, k: t.update(weight=t["weight"][:, :1]), "weight must be [C_out, C_in/groups"),
        (lambda t, k: t.update(bias=t["bias"][:-1]), "bias must have shape"),
        (lambda t, k: k.update(groups=3), "groups must divide C_in and C_out"),
        (lambda t, k: k.update(offset_groups=5), "offset_groups must divide C_in"),
        (lambda t, k: t.update(input=t["input"][0]), "input must be 4-D"),
        (lambda t, k: t.update(mask=t["mask"].float()), "mask must be torch.float64"),
        (lambda t, k: k.update(stride=(0, 1)), "stride must be >= 1"),
        (lambda t, k: k.update(dilation=(9, 1)), "the output is empty"),
    ],
)
def test_argument_checks_name_the_argument(change, message):
    tensors, geometry, groups = make_case(CONFIGS[0], seed=6)
    kwargs = {**geometry, **groups}
    change(tensors, kwargs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        modulated_deform_conv2d(tensors["input"], tensors["offset"], tensors["mask"], tensors["weight"],
                                tensors["bias"], **kwargs)


def test_int_parameters_and_empty_sizes_in_the_conv2d_reference():
    """Ints for stride / padding / dilation, groups inferred; N = 0, C_in = 0, C_out = 0."""
    generator = torch.Generator().manual_seed(15)
    x = torch.randn(2, 4, 7, 6, generator=generator, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    expected = F.conv2d(x, w, b, (2, 2), (1, 1), (1, 1), 2)
    torch.testing.assert_close(conv2d(x, w, b, stride=2, padding=1, dilation=1), expected)
    assert conv2d(x[:0], w, b, padding=1).shape == (0, 6, 7, 6)
    assert conv2d(x, w[:0], b[:0], padding=1, groups=2).shape == (2, 0, 7, 6)
    only_bias = conv2d(x[:, :0], w[:, :0], b, padding=1, groups=1)
    torch.testing.assert_close(only_bias, b.view(1, 6, 1, 1).expand(2, 6, 7, 6))


@pytest.mark.parametrize("change, error, message", [
    ({"stride": 1.5}, TypeError, "stride must be an int or a pair of ints, got 1.5"),
    ({"padding": (1, 1, 1)}, TypeError, r"padding must be an int or a pair of ints, got \(1, 1, 1\)"),
    ({"dilation": 0}, ValueError, "dilation must be >= 1, got 0"),
    ({"groups": 0}, ValueError, "groups must be an int >= 1, got 0"),
    ({"offset_groups": 2.0}, TypeError, "offset_groups must be an int, got 2.0"),
])
def test_int_pair_and_group_arguments_are_checked(change, error, message):
    tensors, geometry, groups = make_case(CONFIGS[0], seed=7)
    with pytest.raises(error, match=message):
        modulated_deform_conv2d(tensors["input"], tensors["offset"], tensors["mask"],
                                tensors["weight"], tensors["bias"], **{**geometry, **groups, **change})


def test_ints_and_inferred_groups_equal_the_explicit_call():
    tensors, geometry, groups = make_case(CONFIGS[6], seed=8)  # groups 2, all ints
    args = (tensors["input"], tensors["offset"], tensors["mask"], tensors["weight"], tensors["bias"])
    explicit = modulated_deform_conv2d(*args, **geometry, **groups)
    short = {name: value[0] if value[0] == value[1] else value for name, value in geometry.items()}
    assert torch.equal(modulated_deform_conv2d(*args, **short), explicit)
