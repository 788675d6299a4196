"""The float64 reference of ``ms_deform_attn`` and the grid_sample peer, against the contract.

The oracle here is a loop over every output element that applies the
contract's clauses one by one (the pixel of a normalised location, B0's
zero-outside rule and corners, the weighted sum), in Python floats: it shares
no code with the reference. The grid_sample peer (Deformable DETR's
formulation) must then agree with the reference to float64 rounding, forward
and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.peers import ms_deform_attn_gridsample as gridsample
from kernels.reference import ms_deform_attn as reference

SHAPES = [(5, 6), (3, 3), (1, 2)]


def make_inputs(shapes=SHAPES, N=2, Lq=4, M=2, D=3, P=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=generator, dtype=torch.float64)
    # Locations in [-0.3, 1.3]: some outside [0, 1], some on no map at all.
    locations = torch.rand(N, Lq, M, L, P, 2, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.randn(N, Lq, M, L, P, generator=generator, dtype=torch.float64)
    return (value.to(dtype), spatial_shapes, reference.level_start_index_of(spatial_shapes),
            locations.to(dtype), weights.to(dtype))


def b0(level_map, y, x):
    """B0 of one H×W map (a list of rows) at (y, x), by the contract's words."""
    height, width = len(level_map), len(level_map[0]) if level_map else 0
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for cy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for cx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= cy <= height - 1 and 0 <= cx <= width - 1:
                total += wy * wx * level_map[cy][cx]
    return total


def contract_loop(value, spatial_shapes, level_start_index, locations, weights, softmax=False):
    """out[n, q, m·D + d] = Σ_l Σ_p a · B0(value_l[n, ·, ·, m, d], loc_y·H − 0.5, loc_x·W − 0.5)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    if softmax:
        flat = weights.reshape(N, Lq, M, L * P)
        weights = (flat.exp() / flat.exp().sum(-1, keepdim=True)).reshape(weights.shape)
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    for n in range(N):
        for m in range(M):
            for d in range(D):
                maps = []
                for (height, width), start in zip(spatial_shapes.tolist(),
                                                  level_start_index.tolist(), strict=True):
                    flat = value[n, start:start + height * width, m, d].tolist()
                    maps.append([flat[r * width:(r + 1) * width] for r in range(height)])
                for q in range(Lq):
                    total = 0.0
                    for level, (height, width) in enumerate(spatial_shapes.tolist()):
                        for p in range(P):
                            lx, ly = locations[n, q, m, level, p].tolist()
                            total += weights[n, q, m, level, p].item() * b0(
                                maps[level], ly * height - 0.5, lx * width - 0.5)
                    out[n, q, m * D + d] = total
    return out


@pytest.mark.parametrize("softmax", [False, True])
def test_reference_is_the_contracts_sum_over_levels_and_points(softmax):
    tensors = make_inputs()
    expected = contract_loop(*tensors, softmax=softmax)
    actual = reference.ms_deform_attn(*tensors, softmax=softmax)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-13)


def test_points_on_the_borders_and_corners_of_a_level():
    """Locations whose pixels are exactly −1, 0, H−1, H (B0's clauses), and the pixel centres."""
    value, shapes, starts, _, _ = make_inputs(shapes=[(4, 5)], Lq=1, P=1)
    pixels = torch.tensor([-1.0, -0.5, 0.0, 2.0, 3.0, 3.5, 4.0, 5.0])
    grid_y, grid_x = torch.meshgrid(pixels, pixels, indexing="ij")
    count = grid_y.numel()
    locations = torch.stack(((grid_x.flatten() + 0.5) / 5, (grid_y.flatten() + 0.5) / 4), -1)
    locations = locations.to(torch.float64).reshape(1, count, 1, 1, 1, 2).expand(2, -1, 2, -1, -1, -1)
    weights = torch.ones(2, count, 2, 1, 1, dtype=torch.float64)
    expected = contract_loop(value, shapes, starts, locations, weights)
    actual = reference.ms_deform_attn(value, shapes, starts, locations.contiguous(), weights)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-14)
    assert actual.abs().sum() > 0  # the pixel centres are inside


def test_an_empty_level_contributes_nothing():
    value, shapes, starts, locations, weights = make_inputs(shapes=[(5, 6), (3, 3)])
    with_empty = torch.tensor([[5, 6], [0, 0], [3, 3]])
    locations3 = torch.cat((locations[:, :, :, :1], locations[:, :, :, :1], locations[:, :, :, 1:]), 3)
    weights3 = torch.cat((weights[:, :, :, :1], weights[:, :, :, :1], weights[:, :, :, 1:]), 3)
    actual = reference.ms_deform_attn(value, with_empty, reference.level_start_index_of(with_empty),
                                      locations3, weights3)
    torch.testing.assert_close(actual, reference.ms_deform_attn(value, shapes, starts, locations,
                                                                weights), rtol=0, atol=1e-15)


def test_queries_split_into_chunks_give_the_same_output_and_gradients(monkeypatch):
    tensors = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(Lq=9)]
    whole = reference.ms_deform_attn(*tensors)
    grads = torch.autograd.grad(whole.square().sum(), [tensors[0], tensors[3], tensors[4]])
    monkeypatch.setattr(reference, "MAX_CHUNK_ELEMENTS", 50)  # a query or two per chunk
    chunked = reference.ms_deform_attn(*tensors)
    chunked_grads = torch.autograd.grad(chunked.square().sum(), [tensors[0], tensors[3], tensors[4]])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    for got, want in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("softmax", [False, True])
def test_gridsample_peer_matches_the_reference_forward_and_gradients(softmax):
    tensors = make_inputs(shapes=[(7, 9), (4, 5), (2, 3), (1, 1)], D=4)
    floats = [0, 3, 4]
    ref_in = [t.clone().requires_grad_() if i in floats else t for i, t in enumerate(tensors)]
    peer_in = [t.clone().requires_grad_() if i in floats else t for i, t in enumerate(tensors)]
    ref = reference.ms_deform_attn(*ref_in, softmax=softmax)
    peer = gridsample.ms_deform_attn(*peer_in, softmax=softmax)
    torch.testing.assert_close(peer, ref, rtol=0, atol=1e-13)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad)
    peer.backward(grad)
    for i in floats:
        torch.testing.assert_close(peer_in[i].grad, ref_in[i].grad, rtol=0, atol=1e-12)


def test_level_start_index_is_the_cumulative_sum_from_zero():
    shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    assert reference.level_start_index_of(shapes).tolist() == [0, 20, 26]


def _bad(**changes):
    value, shapes, starts, locations, weights = make_inputs()
    tensors = {"value": value, "spatial_shapes": shapes, "level_start_index": starts,
               "sampling_locations": locations, "attention_weights": weights}
    tensors.update(changes)
    return tensors


BAD_ARGUMENTS = {
    "value_3d": (_bad(value=torch.zeros(2, 10, 3)), ValueError, "value must be 4-D"),
    "shapes_int32": (_bad(spatial_shapes=torch.tensor(SHAPES, dtype=torch.int32)), TypeError,
                     "spatial_shapes must be int64"),
    "starts_length": (_bad(level_start_index=torch.tensor([0, 30])), ValueError,
                      r"level_start_index must be \[L\] = \[3\]"),
    "locations_levels": (_bad(sampling_locations=torch.zeros(2, 4, 2, 2, 3, 2, dtype=torch.float64)),
                         ValueError, "sampling_locations must be"),
    "weights_shape": (_bad(attention_weights=torch.zeros(2, 4, 2, 3, 2, dtype=torch.float64)),
                      ValueError, "attention_weights must be"),
    "weights_dtype": (_bad(attention_weights=torch.zeros(2, 4, 2, 3, 3)), TypeError,
                      "attention_weights must have value's dtype"),
    "level_past_S": (_bad(level_start_index=torch.tensor([0, 30, 40])), ValueError,
                     "must end within value's S=41"),
    "negative_size": (_bad(spatial_shapes=torch.tensor([[5, 6], [-3, 3], [1, 2]])), ValueError,
                      r"spatial_shapes\[1\] must be >= 0"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(name):
    tensors, error, message = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        reference.ms_deform_attn(*tensors.values())
    with pytest.raises(error, match=message):
        gridsample.ms_deform_attn(*tensors.values())
