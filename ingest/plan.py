"""The contract between a dataset adapter (``ingest/<name>.py``) and the shard writer: ``IngestPlan``.

An adapter's ``plan(root, *, ...)`` returns one (``ingest/cli.py`` lists what an adapter module
exposes); ``shards.writer.write_dataset`` consumes it.
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
