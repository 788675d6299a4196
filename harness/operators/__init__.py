"""Operator and implementation registrations, one module per operator family.

Importing this package imports every module in it, and each registers its
operators and implementations: adding an operator family is adding a module.
``harness.registry.load_all`` does so on first use.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
