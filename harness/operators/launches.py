"""What a checked call of our kernels is watched for (``registry.CHECK_OBSERVERS``).

While an implementation's checked call runs, the kernel wrappers fill every
output they allocate with NaN (``kernels.launch.poisoned_outputs``), so an
element a kernel never writes cannot pass, and every launch is logged
(``kernels.launch.recorded_launches``) for the row's ``kernel_variant``. Here,
and not in the harness core, because it is knowledge of ``kernels``.
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
