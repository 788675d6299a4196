"""The comparison every kernel test makes against the float64 reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def close_to_reference(rel_l2: Mapping[torch.dtype, float], max_abs: Mapping[torch.dtype, float]
                       ) -> Callable[[str, torch.Tensor, torch.Tensor, torch.dtype], None]:
    """``assert_close(name, actual, expected, dtype)`` with these per-dtype bounds.

    ``actual`` must have ``dtype`` and ``expected``'s shape, be finite (a NaN is
    an unwritten, poisoned element), be exactly 0 where the whole reference is
    0, and otherwise stay within the relative L2 and the max-abs (relative to
    max |reference|) bounds.
    """

    def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor,
                     dtype: torch.dtype) -> None:
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
        actual = actual.double().cpu()
        expected = expected.cpu()
        assert torch.isfinite(actual).all(), f"{name}: NaN or Inf (unwritten or poisoned elements?)"
        scale = expected.abs().max().item()
        if scale == 0:
            assert actual.abs().max().item() == 0, f"{name}: nonzero where the reference is 0"
            return
        rel = ((actual - expected).norm() / expected.norm()).item()
        worst = (actual - expected).abs().max().item() / scale
        assert rel <= rel_l2[dtype] and worst <= max_abs[dtype], (
            f"{name}: rel L2 {rel:.2e} (bound {rel_l2[dtype]:.0e}), "
            f"max abs / max |ref| {worst:.2e} (bound {max_abs[dtype]:.0e})"
        )

    return assert_close
