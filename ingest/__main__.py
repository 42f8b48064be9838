"""``python -m ingest``: the same as the ``ingest`` console script."""
from .cli import main

raise SystemExit(main())
