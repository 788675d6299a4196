"""Harness test fixtures: the toy operator in a private registry and suite files."""

from __future__ import annotations

import textwrap

import pytest
from harness_toy import TOY_SUITE, Calls, register_toy

from harness import registry


@pytest.fixture
def toy(monkeypatch):
    """A private registry holding only ``toy_scale`` (nothing leaks into the real
    one); returns the implementations' call log."""
    registry.load_all()  # the real registrations first: their check observers stay
    monkeypatch.setattr(registry, "OPERATORS", {})
    monkeypatch.setattr(registry, "IMPLEMENTATIONS", {})
    monkeypatch.setattr(registry, "load_all", lambda: None)
    calls = Calls()
    register_toy(calls)
    return calls


@pytest.fixture
def write_suite(tmp_path):
    """Write a suite file from TOML text; returns its path as a string."""
    def write(text: str, name: str = "toy") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


@pytest.fixture
def toy_suite(toy, write_suite):
    """The toy suite: C in (2, 3), modes random and zeros, forward and backward."""
    return write_suite(TOY_SUITE)
