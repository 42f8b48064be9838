"""Train a multi-label classifier from partial labels with the large-loss schemes.

    accelerate launch train/main.py --config configs/voc.yaml --config configs/methods/ll_ct.yaml [key=value ...]
    python train/main.py --config configs/demo.yaml method=ll_cp seed=1
    python train/main.py resume=runs/demo-ll_cp-s1          # continue a killed run exactly

Config files are applied in order, then ``key=value`` overrides; every key is a field of
``train.config.Config`` or of the loss's ``train.losses.LossConfig`` (``--list-keys`` prints them with their
defaults and choices). The resolved config is written to ``<out>/<run_name>/config.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: the checkout is the package largeloss
    import importlib.util

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("largeloss", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    sys.modules["largeloss"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["largeloss"])

from largeloss.train.config import Config, ConfigError, build_config, describe_keys, resume_config  # noqa: E402


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(
        prog="train/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable, applied in order)")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every config key with its default and choices, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.list_keys:
        print("\n".join(describe_keys()))
        raise SystemExit(0)
    resume = [o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")]
    if resume:
        return _resume_config(resume[0], [o for o in args.overrides if not o.startswith("resume=")], args.config)
    return build_config(args.config, args.overrides)


# keys that may change when a run is resumed (they do not change what is computed)
RESUMABLE_OVERRIDES = ("progress", "num_workers", "log_every", "flush_every")


def _resume_config(run_dir: str, overrides: list[str], files: list[str]) -> Config:
    if files:
        raise ConfigError("resume: the config comes from the run directory; drop --config")
    bad = [o for o in overrides if o.split("=", 1)[0] not in RESUMABLE_OVERRIDES]
    if bad:
        raise ConfigError(f"resume: only {', '.join(RESUMABLE_OVERRIDES)} may be overridden, got {bad}")
    return resume_config(run_dir, overrides)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from largeloss.shards.format import FormatError
    from largeloss.shards.loader import SampleError
    from largeloss.train.images import ImageSource
    from largeloss.train.loop import run
    from largeloss.train.model import WeightsError

    try:
        run(cfg, ImageSource)
    except (ConfigError, WeightsError, FileExistsError, FormatError, SampleError) as e:  # bad input: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
