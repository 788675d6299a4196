"""``python -m harness``: the ``dcnbench`` command from a plain checkout."""

from harness.cli import main

raise SystemExit(main())
