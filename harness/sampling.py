"""The sampling view's data: where one output location of a deformable operator samples
its input.

Each deformable operator declares a ``sampling_view(params, arrays)`` on its
``Operator`` (``harness/operators/<op>.py``): it reads a saved case (the ``.npz``
of ``dcnbench case … --save``: ``params`` plus the tensors by their contract
names) and returns a :class:`SamplingPicture`, using the reference's own geometry
code so the picture follows the contract exactly. ``reports.sampling`` draws it.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SamplingPicture:
    op: str
    case_id: str
    title: str  # which output location, batch element and group
    heat: np.ndarray  # [H, W]: the input the location reads (mean over its channels)
    regular: np.ndarray  # [P, 2]: (y, x) of each tap without offsets
    deformed: np.ndarray  # [P, 2]: (y, x) of each tap with the case's offsets
    weight: np.ndarray | None  # [P]: each tap's modulation (mask), None without one
    labels: list[str]  # one per tap


def grid_points(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """[len(ys)·len(xs), 2]: every (y, x) of a bin's sample grid, rows outer."""
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_y.ravel(), grid_x.ravel()], axis=1)
