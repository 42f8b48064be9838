"""``python -m ingest``: the same as the ``ingest`` console script."""
from largeloss.ingest.cli import main

raise SystemExit(main())
