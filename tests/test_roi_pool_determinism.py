"""Deterministic backwards of the RoI pooling kernels, on the emulator.

Under ``torch.use_deterministic_algorithms(True)`` the backwards scatter
grad_input into fixed-point int64 sums (``kernels/determinism.py``): the
result must not depend on the order the atomics run in. Permuting the RoIs
(and grad_output with them) changes that order and nothing else, so the
deterministic grad_input must keep its bits, and, as the control that shows
the permutation changes the order at all, the float-atomic one must not.

The atomics issued are counted by the counting build of the very same .cu
file (``-DDCNBENCH_COUNT_ATOMICS``: ``ScatterAdd`` counts what it issues, as
in ``scripts/count_atomics.py``): the deterministic path must issue as many
as the float one, exactly the count the geometry gives.
"""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch
from test_deform_roi_pool import assert_close, call, reference_call

from kernels import launch
from kernels.cuda_sources import CudaSource
from kernels.ops import deform_psroi_pool as psroi_ops
from kernels.ops import deform_roi_pool as ops
from kernels.reference import deform_psroi_pool as psroi_reference

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

OPS = ("roi_align", "deform_roi_pool", "modulated_deform_roi_pool")
N, C, H, W = 2, 3, 6, 7
POOLED = (3, 2)
SAMPLING_RATIO = 2
K = 40


def overlapping_inputs(op: str, seed: int) -> dict:
    """K RoIs wholly inside a small map (every sample and corner on it, at
    generic positions: every corner weight non-zero), overlapping heavily, and
    small offsets; float32."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(K, 2, generator=generator) * 1.5 + 0.7
    size = torch.rand(K, 2, generator=generator) * 2.0 + 1.3
    index = torch.randint(N, (K, 1), generator=generator).float()
    rois = torch.cat([index, low, low + size], dim=1)  # x1, y1 < 2.2; x2, y2 < 5.5
    bins = (K, 1, *POOLED)
    return {
        "input": torch.randn(N, C, H, W, generator=generator),
        "rois": rois,
        "offset": None if op == "roi_align" else torch.rand(K, 2, *POOLED, generator=generator) * 0.2,
        "mask": torch.rand(bins, generator=generator) + 0.5 if op.startswith("modulated") else None,
    }


def params(op: str, design: str) -> dict:
    extra = {} if op == "roi_align" else {"gamma": 0.1}
    return dict(pooled_h=POOLED[0], pooled_w=POOLED[1], spatial_scale=1.0,
                sampling_ratio=SAMPLING_RATIO, design=design, **extra)


def grad_output_with_spread(shape, seed: int) -> torch.Tensor:
    """Magnitudes over 12 binary orders: float sums depend on their order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2.0 ** torch.randint(-6, 6, shape,
                                                                          generator=generator)


def gradients(op: str, inputs: dict, grad_output: torch.Tensor, order: torch.Tensor,
              design: str) -> list:
    """Every gradient of ``op`` with the RoIs in ``order``, back in the original order."""
    permuted = {n: None if t is None or n == "input" else t[order] for n, t in inputs.items()}
    permuted["input"] = inputs["input"]
    leaves = {n: None if t is None else t.clone().requires_grad_(n != "rois")
              for n, t in permuted.items()}
    out = call(ops, op, leaves, params(op, design))
    names = [n for n in ("input", "offset", "mask") if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_output[order])
    inverse = torch.argsort(order)
    return [g if n == "input" else g[inverse] for n, g in zip(names, grads, strict=True)]


@pytest.mark.parametrize(
    "op, dtype",
    [*((op, torch.float32) for op in OPS), ("modulated_deform_roi_pool", torch.float64)],
    ids=lambda v: str(v).removeprefix("torch."),
)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_deterministic_backward_does_not_depend_on_the_order(op, dtype, design,
                                                             deterministic_algorithms):
    inputs = {n: None if t is None else t.to(dtype) for n, t in overlapping_inputs(op, 1).items()}
    grad_output = grad_output_with_spread((K, C, *POOLED), seed=2).to(dtype)
    order = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    identity = torch.arange(K)
    first = gradients(op, inputs, grad_output, identity, design)
    for again, permuted in zip(first, gradients(op, inputs, grad_output, order, design),
                               strict=True):
        assert torch.equal(again, permuted)
    for again, repeated in zip(first, gradients(op, inputs, grad_output, identity, design),
                               strict=True):
        assert torch.equal(again, repeated)
    # Accurate too: against the float64 reference.
    references = {n: None if t is None else t.double().requires_grad_(n != "rois")
                  for n, t in inputs.items()}
    expected = reference_call(op, references, params(op, design))
    expected_grad = torch.autograd.grad(expected, references["input"], grad_output.double())[0]
    assert_close("grad_input", first[0], expected_grad, dtype)

    # The control: the float atomics do see a different order.
    torch.use_deterministic_algorithms(False)
    floats = gradients(op, inputs, grad_output, identity, design)[0]
    assert not torch.equal(floats, gradients(op, inputs, grad_output, order, design)[0])


@pytest.mark.parametrize("design", psroi_ops.DESIGNS)
def test_deterministic_psroi_backward_does_not_depend_on_the_order(design,
                                                                   deterministic_algorithms):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(N, 2 * 4, H, W, generator=generator)  # output_dim 2, group_size 2
    rois = overlapping_inputs("roi_align", seed=5)["rois"]
    trans = torch.rand(K, 2, 3, 3, generator=generator) * 0.2
    grad_output = grad_output_with_spread((K, 2, 3, 3), seed=6)
    arguments = dict(spatial_scale=1.0, output_dim=2, group_size=2, pooled_size=3,
                     sample_per_part=2, trans_std=0.1)

    def grad_input(order):
        leaf = x.clone().requires_grad_()
        out = psroi_ops.deform_psroi_pool(leaf, rois[order], trans[order], **arguments,
                                          design=design)
        return torch.autograd.grad(out, leaf, grad_output[order])[0]

    order = torch.randperm(K, generator=torch.Generator().manual_seed(7))
    deterministic = grad_input(torch.arange(K))
    assert torch.equal(deterministic, grad_input(order))
    x64 = x.double().requires_grad_()
    expected = psroi_reference.deform_psroi_pool(x64, rois.double(), trans.double(), **arguments)
    assert_close("grad_input", deterministic,
                 torch.autograd.grad(expected, x64, grad_output.double())[0], torch.float32)
    torch.use_deterministic_algorithms(False)
    assert not torch.equal(grad_input(torch.arange(K)), grad_input(order))


# --------------------------------------------------------------------------- #
# Atomics issued.
# --------------------------------------------------------------------------- #

COUNTING = "-DDCNBENCH_COUNT_ATOMICS"  # deterministic_atomics.cuh counts what ScatterAdd issues


@pytest.fixture
def count_atomics(monkeypatch):
    """Makes ``source``'s kernels on the CPU its counting build (as
    scripts/count_atomics.py does); returns its counters [float, fixed point]."""

    def install(source: CudaSource) -> ctypes.Array:
        counting = dataclasses.replace(source, options=(*source.options, COUNTING))
        module = launch.Module(counting, torch.device("cpu"))
        cpu = torch.device("cpu")
        key = (source.filename, launch._backend(cpu), cpu.type, cpu.index)
        monkeypatch.setitem(launch._modules, key, module)
        build = module._raw._build
        build.entries("plain")  # built once, kept loaded
        library = build._libraries["plain"]
        return (ctypes.c_ulonglong * 2).in_dll(library, "dcnbench_atomics_issued")

    return install


def atomics_of_backward(op: str, deterministic: bool, counters: ctypes.Array,
                        design: str) -> list[int]:
    """[float, fixed-point] atomics of one backward of ``op``."""
    inputs = overlapping_inputs(op, seed=8)
    counters[0] = counters[1] = 0
    torch.use_deterministic_algorithms(deterministic)
    try:
        gradients(op, inputs, grad_output_with_spread((K, C, *POOLED), seed=9), torch.arange(K),
                  design)
    finally:
        torch.use_deterministic_algorithms(False)
    return list(counters)


KERNEL_SOURCES = {"pw_fastest": ops.SOURCE, "channels_fastest": ops.CHANNELS_FASTEST_SOURCE}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_deterministic_backward_issues_the_same_atomics(op, design, count_atomics):
    """One atomic per (RoI, bin, sample, channel, corner): every sample and
    corner of these RoIs is on the map with a non-zero weight, so the count is
    K·bins·sampling_ratio²·C·4, in both modes (the forward issues none; the
    channels-fastest design's dead lanes none either)."""
    counters = count_atomics(KERNEL_SOURCES[design])
    expected = K * POOLED[0] * POOLED[1] * SAMPLING_RATIO**2 * C * 4
    assert atomics_of_backward(op, False, counters, design) == [expected, 0]
    assert atomics_of_backward(op, True, counters, design) == [0, expected]


PSROI_KERNEL_SOURCES = {
    "pw_fastest": psroi_ops.SOURCE,
    "channels_fastest": psroi_ops.CHANNELS_FASTEST_SOURCE,
    "samples_fastest": psroi_ops.SAMPLES_FASTEST_SOURCE,
}


@pytest.mark.parametrize("design", psroi_ops.DESIGNS)
def test_deterministic_psroi_backward_issues_the_same_atomics(design, count_atomics):
    """One atomic per (RoI, bin, sample, output channel, corner), in both modes:
    the RoIs' samples (y2 below 4.5: the last row's samples stay below H − 1) and
    corners are all on the map at generic positions (a non-zero trans), so the
    count is K·bins·sample_per_part²·output_dim·4 (the samples-fastest design's
    idle lanes issue none)."""
    counters = count_atomics(PSROI_KERNEL_SOURCES[design])
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(N, 2 * 4, H, W, generator=generator)  # output_dim 2, group_size 2
    rois = overlapping_inputs("roi_align", seed=11)["rois"]
    rois[:, 4].clamp_(max=4.4)
    trans = torch.rand(K, 2, 3, 3, generator=generator) * 0.2 + 0.01
    grad_output = grad_output_with_spread((K, 2, 3, 3), seed=12)
    arguments = dict(spatial_scale=1.0, output_dim=2, group_size=2, pooled_size=3,
                     sample_per_part=3, trans_std=0.1, design=design)

    def atomics(deterministic: bool) -> list[int]:
        counters[0] = counters[1] = 0
        torch.use_deterministic_algorithms(deterministic)
        try:
            leaf = x.clone().requires_grad_()
            out = psroi_ops.deform_psroi_pool(leaf, rois, trans, **arguments)
            torch.autograd.grad(out, leaf, grad_output)
        finally:
            torch.use_deterministic_algorithms(False)
        return list(counters)

    expected = K * 3 * 3 * 3**2 * 2 * 4
    assert atomics(False) == [expected, 0]
    assert atomics(True) == [0, expected]
