"""What a checked call of our kernels is watched for (``registry.CHECK_OBSERVERS``).

While an implementation's checked call runs, the kernel wrappers fill every
output they allocate with NaN (``kernels.launch.poisoned_outputs``), so an
element a kernel never writes cannot pass, and every launch is logged
(``kernels.launch.recorded_launches``) for the row's ``kernel_variant``; under
``dcnbench run --device counters`` the emulator counts the launches for the row's
``counters``. Here, and not in the harness core, because it is knowledge of ``kernels``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from harness import registry
from kernels import launch


@contextlib.contextmanager
def poisoned_and_logged() -> Iterator[Callable[[], dict[str, Any]]]:
    with launch.poisoned_outputs(), launch.recorded_launches() as log:
        yield lambda: {"kernel_variant": launch.variants(log) or None}


registry.CHECK_OBSERVERS.append(poisoned_and_logged)


@contextlib.contextmanager
def counted_launches(case, impl: str, direction: str) -> Iterator[Callable[[], dict | None]]:
    """The emulator's counters of the ``with`` block's launches (docs/counters.md)."""
    from harness import counters  # it runs cases through the harness: imported on use

    with counters.counting() as launches:
        yield lambda: counters.row_metrics(counters.summarize(
            case, impl, direction, launches, counters.DEFAULT_GPU)) if launches else None


registry.LAUNCH_COUNTERS.append(counted_launches)
