"""``python -m ingest``: the same as the ``ingest`` console script."""
from ingest.cli import main

raise SystemExit(main())
