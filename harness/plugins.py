"""Plugins: implementations, operators and metrics from outside this repository.

A plugin is an importable module that registers what it brings with the
decorators the repository's own modules use (``harness.registry.implementation``
and ``register_operator``, ``harness.metrics.metric``) when it is imported.
Three routes load one:

- the entry-point group ``dcnbench.plugins`` of an installed package (its value
  a module, ``my_pkg.dcnbench_plugin``): loaded by ``harness.registry.load_all``,
  so every command and test sees it;
- ``--plugin MODULE`` (repeatable) on the ``dcnbench`` command line and
  ``--dcn-plugin MODULE`` on the pytest entry (``benchmarks/``);
- ``plugins = ["module", ...]`` in a suite file, loaded before the suite's
  implementation names are resolved.

Each loaded module is recorded in ``LOADED`` with the route that loaded it
(the run's metadata keeps them); a row's ``impl_source`` names the module
that registered its implementation. ``examples/plugin/`` is a working one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable

ENTRY_POINT_GROUP = "dcnbench.plugins"
LOADED: dict[str, str] = {}  # module name -> how it was loaded
_entry_points_loaded = False


class PluginError(ImportError):
    """A plugin that cannot be imported, or registers something wrong."""


def _import(module: str, route: str) -> None:
    if module in LOADED:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise PluginError(f"plugin {module!r} ({route}) is not importable: {exc}") from exc
    LOADED[module] = route


def load_entry_points() -> None:
    """Import every module of the ``dcnbench.plugins`` entry-point group, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = entry.dist.name if entry.dist else "an installed package"
        _import(entry.value.split(":")[0], f"entry point {entry.name!r} of {package}")


def load(modules: Iterable[str], route: str = "--plugin") -> None:
    """Import ``modules`` (after the built-in registrations and the entry points)."""
    from harness import registry

    registry.load_all()
    for module in modules:
        _import(module, route)
