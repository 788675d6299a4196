"""Fake DCNv4 1.0.0.post2: ``DCNv4.functions`` (see tests/fakes/README.md)."""
