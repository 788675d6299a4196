"""The ``deterministic`` check: does an implementation's backward give the same bits twice?

Under ``torch.use_deterministic_algorithms(True)`` the contract
(``docs/ops-semantics.md``, "Determinism") wants every backward either
bit-reproducible or raising PyTorch's error. The check builds the graph once
in that mode, with ``warn_only=True`` so that a peer without a deterministic
path still runs (PyTorch then warns instead of raising; the warning is
silenced here), runs the backward twice and compares the gradients bit for
bit. The row's ``deterministic`` field records the answer: true for our
kernels' fixed-point backwards, false where float atomics (torchvision's,
``grid_sample``'s on a GPU) give another rounding on the second run.

A false is evidence, a true is not proof: two runs that happen to agree
would also read true.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

# Integer types of each float width: bits compare exactly (NaN included).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic")
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the very same bits (NaNs of one pattern are equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        bits = _BITS[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def backward_is_reproducible(
    forward: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    names: tuple[str, ...],
    grad_output: torch.Tensor,
) -> bool:
    """Run the backward of ``forward`` twice in deterministic mode; compare the gradients
    of the ``names`` inputs bit for bit."""
    with deterministic_algorithms():
        leaves = {name: inputs[name].detach().requires_grad_() for name in names}
        out = forward({**inputs, **leaves}, params)
        runs = [
            torch.autograd.grad(out, list(leaves.values()), grad_output, retain_graph=keep,
                                materialize_grads=True)
            for keep in (True, False)
        ]
    return all(same_bits(a, b) for a, b in zip(*runs, strict=True))
