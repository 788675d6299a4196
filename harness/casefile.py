"""Saved cases: one ``.npz`` per case, in the contract's format.

Each tensor is stored under its contract name (``input``, ``offset``, ...),
then ``output``, and after a backward pass ``grad_output`` and
``grad_<name>`` for each input with a gradient; ``params`` is a JSON string
with the case's parameters plus ``op``, ``dtype``, ``mode``, ``seed``,
``impl``, ``device``, ``case_id`` and the row's ``status``. numpy has no
bfloat16: bfloat16 tensors are stored as float32, which holds them exactly
(``params["dtype"]`` says what they were).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.execution import CaseRun


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def save(path: Path, case_run: CaseRun, impl: str, tensors: dict[str, torch.Tensor],
         status: str) -> None:
    """Write ``case_run``'s inputs and ``impl``'s ``tensors`` (output, gradients) to ``path``."""
    case = case_run.case
    arrays = {name: _to_numpy(t) for name, t in case_run.inputs.items()}
    if case_run.grad_output is not None:
        arrays["grad_output"] = _to_numpy(case_run.grad_output)
    arrays.update({name: _to_numpy(t) for name, t in tensors.items()})
    params = {**case.params, "op": case.op.name, "dtype": case.dtype, "mode": case.mode,
              "seed": case_run.seed, "impl": impl, "device": case_run.device,
              "case_id": case.id, "status": status}
    np.savez(path, params=np.array(json.dumps(params)), **arrays)


def load(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A saved case's ``params`` and its arrays by name."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != "params"}
        return json.loads(str(data["params"])), arrays
