"""The ``ingest`` command: ``ingest <dataset> --out DIR [options]`` and ``ingest verify DIR``.

Each dataset is an adapter module (see ``shards.format.IngestPlan``) registered in ``ADAPTERS``; the CLI adds
the options common to all of them and hands the adapter's plan to ``shards.writer.write_dataset``.
Bad input ends the run with a one-line message and exit status 1 (2 for a bad command line, 130 when
interrupted); an interrupted ingest is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from largeloss.shards.format import FormatError, IngestError
from largeloss.shards.reader import open_dataset, verify
from largeloss.shards.writer import CHECK_MODES, summary_table, write_dataset

#: sub-command -> adapter module, imported when the parser is built
ADAPTERS = {
    "voc": "largeloss.ingest.voc",
    "coco": "largeloss.ingest.coco",
    "nuswide": "largeloss.ingest.nuswide",
    "cub": "largeloss.ingest.cub",
    "openimages": "largeloss.ingest.openimages",
    "demo": "largeloss.ingest.demo",
}
#: adapters that may be absent from an installation; any other import failure is a bug and raises
OPTIONAL_ADAPTERS = frozenset({"demo"})


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


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
    g.add_argument("--strict", action="store_true",
                   help="stop at the first missing or corrupt image instead of skipping and counting it")
    g.add_argument("--overwrite", action="store_true",
                   help="discard an ingest already in --out instead of refusing (another plan) or resuming (the same)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _import_adapter(name: str, module: str) -> ModuleType | str:
    """The adapter module, or for an optional one that is not installed, the reason as a string."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if name in OPTIONAL_ADAPTERS and e.name == module:
            return f"the adapter module {module} is not installed in this copy of largeloss"
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="Convert a dataset from its native layout into WebDataset shards + labels.arrow + manifest.json "
                    "(docs/FORMAT.md), or verify such a directory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in ADAPTERS.items():
        mod = _import_adapter(name, module)
        if isinstance(mod, str):
            # listed in --help and answered with the reason, whatever options follow it
            p = sub.add_parser(name, help=f"(unavailable: {mod})", add_help=False)
            p.set_defaults(unavailable=f"ingest {name}: {mod}")
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _add_common(p)
        p.set_defaults(adapter=mod)
    p = sub.add_parser("verify", help="re-read a dataset directory and report every problem (sha256, ids, labels)",
                       description="Read every shard and labels.arrow of DIR and check them against manifest.json.")
    p.add_argument("dir", metavar="DIR", help="dataset directory written by ingest")
    p.set_defaults(adapter=None)
    return parser


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
    if getattr(args, "unavailable", None):
        print(args.unavailable, file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "verify":
            return _verify(args.dir)
        plan = args.adapter.build(args)
        manifest = write_dataset(args.out, plan, shard_size=args.shard_size, workers=args.workers,
                                 strict=args.strict, check=args.check, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except (IngestError, FormatError, OSError) as e:
        print(f"ingest {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ingest {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_table(manifest))
    print(f"ingest {args.command}: wrote {args.out}")
    return 0
