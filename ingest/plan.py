"""The contract between a dataset adapter (``ingest/<name>.py``) and the shard writer.

Every adapter module exposes:

- ``NAME`` (the sub-command), ``HELP`` (one line) and ``DESCRIPTION`` (the ``--help`` text: the folder
  layout it expects);
- ``add_arguments(parser)``: its own options (``--root`` ...). The CLI adds the common ones: ``--out``,
  ``--shard-size``, ``--workers``, ``--strict``, ``--no-progress``;
- ``build(args) -> IngestPlan``: parse the native files, yield ``Record``s; never read image bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from largeloss.shards.format import Record


@dataclass
class IngestPlan:
    dataset: str  # "voc2012", "coco2014", "nuswide", "cub", "openimages_v3", "demo", ...
    classes: list[dict[str, Any]]  # [{"index": i, "id": source id, "name": display name}]
    #: split name -> records in sample-id order ("train" = official train list, "test" = official val/test)
    splits: dict[str, Iterable[Record]]
    unlisted: str  # shards.format.UNLISTED_NEGATIVE or UNLISTED_UNKNOWN
    source: dict[str, Any] = field(default_factory=dict)  # provenance: root, files read, options
    #: what the adapter itself left out before any image was looked at, per split:
    #: {"train": {"skipped": {"no_positive": 12, "non_trainable_rows": 40}}}; the writer merges these
    #: with its own counts (written / missing / corrupt) into the manifest
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
