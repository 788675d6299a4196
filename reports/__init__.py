"""The static HTML report (``dcnbench report``): site builder, templates, assets.

Needs plotly and jinja2 (the ``report`` extra); the harness imports it only when
the ``report`` command runs.
"""
