"""Train a multi-label classifier from partial labels with the large-loss schemes.

    accelerate launch train/main.py --config configs/voc.yaml --config configs/methods/ll_ct.yaml [key=value ...]
    python train/main.py --config configs/demo.yaml method=ll_cp seed=1
    python train/main.py resume=runs/demo-ll_cp-s1          # continue a killed run exactly

Config files are applied in order, then ``key=value`` overrides; every key is a field of
``train.config.Config`` (``--list-keys`` prints them with their defaults). The resolved config is written
to ``<out>/<run_name>/config.yaml``. Methods: full, an, iu, wan, lsan, epr, ll_r, ll_ct, ll_cp,
ll_r_abs, ll_ct_abs.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["largeloss"] = _pkg

from largeloss.train.config import Config, ConfigError, build_config, coerce, from_dict, parse_overrides  # noqa: E402


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(
        prog="train/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable, applied in order)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.list_keys:
        for f in dataclasses.fields(Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"{f.name} = {default!r}")
        raise SystemExit(0)
    resume = [o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")]
    if resume:
        return _resume_config(resume[0], [o for o in args.overrides if not o.startswith("resume=")], args.config)
    return build_config(args.config, args.overrides)


# keys that may change when a run is resumed (they do not change what is computed)
RESUMABLE_OVERRIDES = ("progress", "num_workers", "log_every")


def _resume_config(run_dir: str, overrides: list[str], files: list[str]) -> Config:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: {path} not found; is this a run directory?")
    if files:
        raise ConfigError("resume: the config comes from the run directory; drop --config")
    bad = [o for o in overrides if o.split("=", 1)[0] not in RESUMABLE_OVERRIDES]
    if bad:
        raise ConfigError(f"resume: only {', '.join(RESUMABLE_OVERRIDES)} may be overridden, got {bad}")
    cfg = from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path))
    cfg.resume = str(run_dir)
    for k, v, where in parse_overrides(overrides):
        setattr(cfg, k, coerce(k, v, where))
    return cfg


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from largeloss.shards.format import FormatError
    from largeloss.train.loop import run
    from largeloss.train.model import WeightsError

    try:
        run(cfg)
    except (WeightsError, FileExistsError, FormatError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
