"""Every kernel's backward once under the emulator's racecheck, on shapes where
many blocks scatter into the same pixels.

The emulator runs a block's threads one after another and only different
blocks at once, so a scatter that lost its atomic (``atomicAdd`` turned into
``+=``) goes unnoticed whenever the colliding threads share a block or run
apart in time: such races are caught by luck. ``DCNBENCH_EMULATOR_MODE=racecheck``
(issue 17) reports any global address one thread writes and another reads or
writes without an atomic, whatever the timing. Here every kernel
implementation of every operator declaration runs forward and backward once
in that mode, on ``scatter_heavy_case``'s shapes.

Until ``kernels.emulator`` has the mode, the racecheck runs are skipped with
that reason (never counted as passed); ``test_cases_scatter_from_many_blocks``
checks the shapes themselves in the normal mode, now.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from harness import registry
from kernels import emulator, launch

RACECHECK_MISSING = (
    None if "racecheck" in emulator.MODES
    else "kernels.emulator has no 'racecheck' mode yet (issue 17; modes: "
    + ", ".join(emulator.MODES) + "): skipped, not passed"
)

# Parameter overrides, by the declarations' parameter names, that make many
# blocks of one launch scatter into the same few input pixels: one image, a
# small map, many channels (the convolution's backward slices them: more
# threads per pixel; 64: 5 blocks of the implicit GEMM's 14-channel grad_sampling
# rows), many RoIs on the same image, groups of several channels
# (DCNv3: G·H·W items of 16 channels, 4 blocks of the vectorized design).
SCATTER_HEAVY = {
    "N": 1,
    "H": 8,
    "W": 8,
    "C_in": 64,
    "C_out": 4,
    "group": 4,
    "group_channels": 16,
    "K": 48,
    "Lq": 128,  # ms_deform_attn: many queries sampling one small map
    "M": 4,
}
# More cases where a declaration has the parameters: D = 6 sends the vectorized
# DCNv3 design down its scalar path (no 16-byte vectors: scalar atomics).
VARIANTS = {"": {}, "D6": {"group_channels": 6}}
# Blocks the backward of every kernel must launch on such a case at least.
MIN_BLOCKS = 4


def kernel_module(implementation: registry.Implementation) -> str:
    """The ``kernels.ops`` module of one of our kernel implementations: the
    module its ``available`` check imports (``registry.kernel_availability``)."""
    module = inspect.getclosurevars(implementation.available).nonlocals.get("module", "")
    if not module.startswith("kernels.ops."):
        raise ValueError(
            f"{implementation.op}/{implementation.name}: expected an availability check of "
            f"registry.kernel_availability('kernels.ops.<module>'), got {module!r}"
        )
    return module.removeprefix("kernels.ops.")


def kernel_implementations() -> list[registry.Implementation]:
    registry.load_all()
    return [impl for (_, _), impl in sorted(registry.IMPLEMENTATIONS.items())
            if impl.kind == "kernel" and impl.has_backward and "cpu" in impl.emulated_on]


def scatter_heavy_case(op: str, variant: str = "", seed: int = 0
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params, float32 CPU inputs) of operator ``op``: its declaration's
    defaults with ``SCATTER_HEAVY`` and ``VARIANTS[variant]`` applied where it
    has those parameters, and its own ``random`` input generator."""
    operator = registry.get_operator(op)
    overrides = {**SCATTER_HEAVY, **VARIANTS[variant]}
    params = operator.resolve({k: v for k, v in overrides.items() if k in operator.params})
    generator = torch.Generator().manual_seed(seed)
    inputs = operator.make_inputs(params, torch.float32, "cpu", generator, "random")
    return params, inputs


RUNS = [(impl, variant) for impl in kernel_implementations() for variant, extra in VARIANTS.items()
        if set(extra) <= set(registry.get_operator(impl.op).params)]
# kernels.ops module / operator / implementation [/ variant]: tests/mutation/run_mutants.py
# picks the racecheck runs of a kernel file's operators by the module.
IDS = ["/".join(filter(None, (kernel_module(impl), impl.op, impl.name, variant)))
       for impl, variant in RUNS]


def forward_and_backward(implementation: registry.Implementation, params: dict,
                         inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The implementation's forward and its gradients of every differentiable
    input, for a seeded random grad_output."""
    operator = registry.get_operator(implementation.op)
    differentiable = {spec.name for spec in operator.tensors if spec.differentiable}
    leaves = {n: t.detach().clone().requires_grad_(n in differentiable and t.is_floating_point())
              for n, t in inputs.items()}
    out = implementation.forward(leaves, params)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    wanted = [t for t in leaves.values() if t.requires_grad]
    return list(torch.autograd.grad(out, wanted, grad_output))


@pytest.mark.parametrize("implementation, variant", RUNS, ids=IDS)
def test_cases_scatter_from_many_blocks(monkeypatch, implementation, variant):
    """On its scatter-heavy case every backward launch of the implementation
    has at least MIN_BLOCKS blocks (of one image: N = 1), so a racecheck run
    sees blocks collide, not just threads of one block."""
    launches: list[tuple[str, int]] = []
    call = launch.Kernel.__call__

    def counting(self, grid, block, args, shared_mem=0, **options):
        blocks = launch._dim3(grid, "grid")
        launches.append((self.name, blocks[0] * blocks[1] * blocks[2]))
        return call(self, grid, block, args, shared_mem, **options)

    monkeypatch.setattr(launch.Kernel, "__call__", counting)
    params, inputs = scatter_heavy_case(implementation.op, variant)
    assert params.get("N", 1) == 1
    grads = forward_and_backward(implementation, params, inputs)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    backward = [(name, blocks) for name, blocks in launches if "backward" in name
                or "col2im" in name]
    assert backward, f"no backward kernel launched; launches: {launches}"
    few = [(name, blocks) for name, blocks in backward if blocks < MIN_BLOCKS]
    assert not few, f"backward launches with fewer than {MIN_BLOCKS} blocks: {few}"


@pytest.mark.skipif(RACECHECK_MISSING is not None, reason=str(RACECHECK_MISSING))
@pytest.mark.parametrize("implementation, variant", RUNS, ids=IDS)
def test_backward_has_no_race(monkeypatch, implementation, variant):
    """Forward and backward under DCNBENCH_EMULATOR_MODE=racecheck: a race
    raises, naming the kernel, the buffer, the element and both threads."""
    params, inputs = scatter_heavy_case(implementation.op, variant)
    monkeypatch.setenv("DCNBENCH_EMULATOR_MODE", "racecheck")
    grads = forward_and_backward(implementation, params, inputs)
    assert all(torch.isfinite(g).all() for g in grads)
