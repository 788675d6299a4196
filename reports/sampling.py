"""The sampling view: where one output location of a deformable operator samples its input.

Each deformable operator declares its ``sampling_view`` on its ``Operator``
(``harness/operators/<op>.py``): it reads a saved case (the ``.npz`` of
``dcnbench case … --save``: ``params`` plus the tensors by their contract
names) and returns a :class:`harness.sampling.SamplingPicture`: a heat map of
the input the output location reads, the regular (undeformed) sample grid and
the deformed sample points, with each point's modulation weight where the
operator has one. The views use the reference's own geometry code, so the
picture follows the contract (``docs/ops-semantics.md``) exactly. Here: which
operators have one, and the picture of a saved case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import registry
from harness.sampling import SamplingPicture

# The view re-runs the reference (float64, on the CPU) on a case taken from a
# results table: a bound on the bytes it moves keeps a hostile or huge row
# from asking for more memory than the machine has.
MAX_SAMPLING_CASE_BYTES = 1 << 30


def viewable_operators() -> list[str]:
    """The operators that declare a sampling view."""
    registry.load_all()
    return [name for name, op in registry.OPERATORS.items() if op.sampling_view is not None]


def picture(path: Path) -> SamplingPicture:
    """The sampling picture of a saved case; ``ValueError`` for an operator without an
    adapter."""
    from harness import casefile

    params, arrays = casefile.load(Path(path))
    view = registry.get_operator(params["op"]).sampling_view
    if view is None:
        raise ValueError(f"{path}: no sampling view for operator {params['op']!r}; "
                         f"expected one of: {', '.join(viewable_operators())}")
    return view(params, arrays)


def save_case(op: str, params: dict[str, Any], dtype: str, mode: str, seed: int,
              path: Path) -> Path:
    """Run ``op``'s reference on one case on the CPU and save it as ``dcnbench case
    --save`` would (the same inputs as the run that holds the case)."""
    from harness import casefile, execution, registry
    from harness.cases import make_case

    operator = registry.get_operator(op)
    # Parameters read back from a results table may have become floats (a column with
    # gaps): give each the type of its default.
    typed = {name: type(operator.params[name])(value) for name, value in params.items()}
    case = make_case(operator, typed, dtype, mode)
    moved = operator.bytes(case.params, 8)
    if moved > MAX_SAMPLING_CASE_BYTES:
        raise ValueError(f"case {case.id}: its float64 reference moves {moved:.3g} bytes; the "
                         f"sampling view takes cases up to {MAX_SAMPLING_CASE_BYTES:.3g} bytes "
                         "(save a smaller one with dcnbench case --save and pass --case)")
    case_run = execution.prepare(case, "cpu", seed, backward=False)
    row, tensors = execution.run(case_run, registry.reference_of(op), "forward", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    casefile.save(path, case_run, row.impl, tensors, row.status)
    return path
