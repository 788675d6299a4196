"""Shared fixtures of the emulator tests: seeded random inputs and the
feature / planted-bug kernel sources of ``tests/emulator/kernels``."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

KERNELS = Path(__file__).parent / "kernels"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name: fresh inputs per test, the
    same ones on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def kernel_source():
    """``kernel_source("features.cu")``: the text of a test kernel file."""
    return lambda name: (KERNELS / name).read_text()
