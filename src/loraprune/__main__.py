"""Entry point for ``python -m loraprune``."""

from loraprune.cli import main

raise SystemExit(main())
