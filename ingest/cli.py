"""The ``ingest`` command: ``ingest <dataset> --out DIR [options]`` and ``ingest verify DIR``.

Each dataset is an adapter module registered in ``ADAPTERS``. An adapter module exposes:

- ``NAME`` (the sub-command), ``HELP`` (one line) and ``DESCRIPTION`` (the ``--help`` text: the folder
  layout it expects);
- ``add_arguments(parser)``: its own options (``--root`` ...);
- ``plan(root, *, ...) -> IngestPlan`` (``shards.format.IngestPlan``): a plain function that parses the native
  files and yields ``Record``s, never reading image bytes. The CLI calls it with every option of
  ``add_arguments`` as a keyword named by its dest, plus those of ``out``, ``workers``, ``strict`` and
  ``progress`` (``not --no-progress``) that it names as parameters.

The CLI adds the options common to all adapters and hands the plan to ``shards.writer.write_dataset``.
Bad input ends the run with a one-line message and exit status 1 (2 for a bad command line, 130 when
interrupted); an interrupted ingest is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ..shards.format import FormatError, IngestError, IngestPlan
from ..shards.jpeg import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, MAX_PIXELS_LIMIT
from ..shards.reader import open_dataset, verify
from ..shards.writer import CHECK_MODES, summary_table, write_dataset
from . import coco, cub, demo, nuswide, openimages, voc
from .argtypes import positive_int, positive_int_at_most

#: sub-command -> adapter module, in the order of ``ingest --help``
ADAPTERS: dict[str, ModuleType] = {m.NAME: m for m in (voc, coco, nuswide, cub, openimages, demo)}
#: the dests of the options ``_add_common`` adds to every adapter's sub-command
COMMON_OPTIONS = ("out", "shard_size", "workers", "check", "max_pixels", "max_side", "quality", "strict", "overwrite",
                  "no_progress")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (common to all datasets)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="dataset directory to write; re-running the same command into it resumes an interrupted run")
    g.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="samples per shard (default 1000)")
    g.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="threads reading and validating images (default min(8, CPUs)); "
                        "the output does not depend on it")
    g.add_argument("--check", choices=CHECK_MODES, default="fast",
                   help="JPEG validation: fast = header + marker structure + end marker (default); "
                        "full = decode every image strictly (about 20x slower)")
    g.add_argument("--max-pixels", type=positive_int_at_most(MAX_PIXELS_LIMIT), default=DEFAULT_MAX_PIXELS,
                   metavar="N",
                   help=f"an image whose JPEG header declares more than N pixels is counted as corrupt (default "
                        f"{DEFAULT_MAX_PIXELS}, 16384 x 16384; at most {MAX_PIXELS_LIMIT}, OpenCV's limit)")
    g.add_argument("--max-side", type=positive_int, default=None, metavar="N",
                   help="re-encode, once, every image whose longer side exceeds N pixels to longer side N (aspect "
                        "ratio kept, antialiased; the manifest records it); default: store the source bytes")
    g.add_argument("--quality", type=positive_int_at_most(100), default=None, metavar="Q",
                   help=f"JPEG quality of the images --max-side re-encodes (default {DEFAULT_QUALITY})")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first missing or corrupt image instead of skipping and counting it")
    g.add_argument("--overwrite", action="store_true",
                   help="discard an ingest already in --out instead of refusing (another plan) or resuming (the same)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="Convert a dataset from its native layout into WebDataset shards + labels.arrow + manifest.json "
                    "(docs/FORMAT.md), or verify such a directory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in ADAPTERS.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _add_common(p)
    p = sub.add_parser("verify", help="re-read a dataset directory and report every problem (sha256, ids, labels)",
                       description="Read every shard and labels.arrow of DIR and check them against manifest.json.")
    p.add_argument("dir", metavar="DIR", help="dataset directory written by ingest")
    return parser


def adapter_plan(command: str, options: dict[str, Any], common: dict[str, Any]) -> IngestPlan:
    """Call adapter ``command``'s ``plan`` with its own ``options`` and the common ones it names.

    ``options`` and ``common`` are the parsed command line by dest (``common`` holds ``COMMON_OPTIONS``).
    """
    mod = ADAPTERS[command]
    passed = {"out": Path(common["out"]), "workers": common["workers"], "strict": common["strict"],
              "progress": not common["no_progress"]}
    wanted = inspect.signature(mod.plan).parameters
    return mod.plan(**options, **{k: v for k, v in passed.items() if k in wanted})


def _verify(path: str) -> int:
    problems = verify(path)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"ingest verify: {len(problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    ds = open_dataset(path)
    parts = ", ".join(f"{s}: {ds.num_samples(s)} samples in {len(ds.shard_paths(s))} shards" for s in ds.split_names)
    print(f"ingest verify: {path} is intact ({parts})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    options = vars(args)
    command = options.pop("command")
    try:
        if command == "verify":
            return _verify(options["dir"])
        common = {k: options.pop(k) for k in COMMON_OPTIONS}  # what is left are the adapter's own options
        if common["quality"] is not None and common["max_side"] is None:
            parser.error("--quality sets the JPEG quality of --max-side re-encoding; give --max-side N too")
        plan = adapter_plan(command, options, common)
        manifest = write_dataset(common["out"], plan, shard_size=common["shard_size"], workers=common["workers"],
                                 strict=common["strict"], check=common["check"], max_pixels=common["max_pixels"],
                                 max_side=common["max_side"],
                                 quality=DEFAULT_QUALITY if common["quality"] is None else common["quality"],
                                 overwrite=common["overwrite"], progress=not common["no_progress"])
    except (IngestError, FormatError, OSError) as e:
        print(f"ingest {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ingest {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_table(manifest))
    print(f"ingest {command}: wrote {common['out']}")
    return 0
