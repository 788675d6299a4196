"""Shared test set-up: ``@pytest.mark.gpu`` tests are skipped (never passed) where
torch sees no CUDA device; ``poisoned_outputs`` fills every kernel output with NaN."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (skipped, not passed)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs():
    """Kernel outputs are NaN until written (``kernels.launch.new_output``)."""
    from kernels import launch

    with launch.poisoned_outputs():
        yield


@pytest.fixture
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the test, restored after."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
