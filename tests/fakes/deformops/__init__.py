"""Fake deformops 3.0.1: ``deformops.registry`` (see tests/fakes/README.md)."""

__version__ = "3.0.1+fake"
