"""The README's main job: build the embedded demo shards, train the paper's methods on CPU, print the table.

    largeloss-demo                       # data/demo + runs/demo, 5 runs (full, an, ll_r, ll_ct, ll_cp)
    largeloss-demo --seeds 0 1 2         # several seeds: the table shows mean +- std
    largeloss-demo --set epochs=4        # config overrides for every run

Each run is `python -m largeloss.train.main --config configs/demo.yaml --config configs/methods/<m>.yaml` in its own
process (so a crash in one is reported and the others still run); a run that already has result.json is
kept, an unfinished one is resumed: re-running the command after an interruption continues where it
stopped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..eval.rundir import RunDir, default_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["full", "an", "ll_r", "ll_ct", "ll_cp"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="largeloss-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="demo shards (built by `ingest demo` when missing)")
    p.add_argument("--runs", default="runs/demo", help="parent folder of the run directories")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--n-train", type=int, default=2000, help="demo training images (official train list)")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="processes for ingest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override passed to every run (repeatable), e.g. --set epochs=4")
    args = p.parse_args(argv)

    t_start = time.time()
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        from ..ingest.cli import main as ingest_main

        rc = ingest_main(["demo", "--out", str(data), "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                          "--workers", str(args.workers)])
        if rc:
            return rc
    failed = []
    run_dirs = []
    for seed in args.seeds:
        for method in args.methods:
            name = default_name("demo", method, seed)
            run_dir = Path(args.runs) / name
            run_dirs.append(run_dir)
            if RunDir(run_dir).finished:
                print(f"[demo] {name}: finished earlier, kept", flush=True)
                continue
            cmd = [sys.executable, "-m", "largeloss.train.main"]
            if RunDir(run_dir).started:
                cmd += [f"resume={run_dir}"]
            else:
                cmd += ["--config", args.config, "--config", str(ROOT / "configs" / "methods" / f"{method}.yaml"),
                        f"data={data}", f"out={args.runs}", f"run_name={name}", f"seed={seed}", *args.overrides]
            print(f"[demo] {' '.join(cmd)}", flush=True)
            t0 = time.time()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            rc = subprocess.call(cmd, cwd=os.getcwd(), env=env)
            print(f"[demo] {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    from ..eval.report import main as report_main

    report_main([str(d) for d in run_dirs]
                + ["--plot", str(Path(args.runs) / "val_map.png"), "--csv", str(Path(args.runs) / "table.csv")])
    print(f"[demo] total wall time {time.time() - t_start:.0f} s", flush=True)
    if failed:
        print(f"[demo] failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
