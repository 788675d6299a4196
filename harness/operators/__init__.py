"""Operator and implementation registrations, one module per operator family.

Importing this package registers everything; ``harness.registry.load_all``
does so on first use.
"""

from harness.operators import conv2d, deform_conv2d  # noqa: F401
