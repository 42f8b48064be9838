"""Hyper-parameter sweeps and seed repeats: one training process per run, resumable, then the report table.

    python -m largeloss.train.sweep --config configs/coco.yaml --methods ll_ct --grid delta_rel=0.1,0.2,0.4 \\
        --seeds 0 1 2 [--out runs/sweep] [--jobs N] [key=value ...]
    python -m largeloss.train.sweep --config configs/coco.yaml --methods full an ll_ct \\
        --grid train_fraction=0.1,0.5,1.0 --seeds 0
    python -m largeloss.train.sweep --features-dir FEATS --config CFG.yaml --methods an ll_r ll_ct ll_cp --seeds 0 1 2

A run is one combination of (method, every ``--grid`` value, seed). ``--grid KEY=V1,V2,...`` may be given
several times (the cartesian product is run); ``--methods M ...`` adds ``configs/methods/<M>.yaml`` after the
``--config`` files (a method file can set more than ``method``: ``full`` sets ``protocol: full``); the
trailing ``key=value`` overrides apply to every run. Every combination is validated with the trainer's
config parser before anything starts, so a typo fails at once.

Run directories are ``<out>/<method>-<key>=<value>-...-s<seed>``. Resumable: a run whose directory has
result.json is skipped; one with config.yaml but no result.json (interrupted) is resumed with
``resume=<dir>``; the others start. Runs go one after the other, or ``--jobs N`` at a time (each its own
process, output in ``<out>/logs/<run>.log``; unless OMP_NUM_THREADS is set, each gets ``cpus // N``
threads). The trainer is ``python -m largeloss.train.main`` (or ``python -m largeloss.train.features train``
with ``--features-dir``). At the end the report's sweep table (test mAP mean ± std over seeds against each grid
key) is printed; ``report RUNS --sweep KEY --plot-sweep FILE.png`` draws Figure 5 / Figure 6.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .. import configs
from ..eval.rundir import RunDir, RunDirError, load_run, method_id


@dataclass
class Job:
    name: str
    run_dir: Path
    configs: list[str]
    overrides: list[str]  # key=value, the grid values and the seed last
    state: str = "new"  # new | resume | done
    log: Path | None = None
    returncode: int | None = None
    seconds: float = 0.0
    grid: dict[str, str] = field(default_factory=dict)

    def argv(self, features_dir: str | None) -> list[str]:
        """The trainer's arguments: ``python -m <module(features_dir)> <argv>`` runs this job."""
        args = ["train", "--features-dir", features_dir] if features_dir is not None else []
        if self.state == "resume":
            return args + [f"resume={self.run_dir}", "progress=false"]
        for c in self.configs:
            args += ["--config", c]
        return args + self.overrides

    def command(self, features_dir: str | None) -> list[str]:
        return [sys.executable, "-m", trainer_module(features_dir), *self.argv(features_dir)]


def trainer_module(features_dir: str | None) -> str:
    """The trainer a sweep runs: heads on cached features, or the end-to-end trainer."""
    return "largeloss.train.features" if features_dir is not None else "largeloss.train.main"


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["delta_rel=0.1,0.2", "seed=..."]`` -> [("delta_rel", ["0.1", "0.2"])]; a key twice is an error."""
    out: list[tuple[str, list[str]]] = []
    seen = set()
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")]
        if not eq or not key or not all(vals):
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with no empty value")
        if key in seen:
            raise ValueError(f"--grid: key {key!r} given twice")
        if key in ("seed", "out", "run_name", "resume"):
            raise ValueError(f"--grid: {key!r} is set by the sweep itself (use --seeds for seeds)")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--grid {item!r}: a value is repeated")
        seen.add(key)
        out.append((key, vals))
    return out


def method_config(method: str) -> str:
    try:
        return str(configs.method(method))
    except FileNotFoundError as e:
        raise ValueError(f"--methods {method}: {e}") from None


def _safe(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in value)


def plan_jobs(configs: list[str], methods: list[str], grid: list[tuple[str, list[str]]], seeds: list[int],
              overrides: list[str], out: Path) -> list[Job]:
    """Every combination as a Job, validated by the trainer's config parser; marks done/resumable runs."""
    from .config import build_config

    fixed = {o.split("=", 1)[0] for o in overrides}
    clash = fixed & ({k for k, _ in grid} | {"seed", "out", "run_name", "resume"})
    if clash:
        raise ValueError(f"key(s) {sorted(clash)} are set by the sweep (grid or seeds) and also given as key=value")
    jobs = []
    keys = [k for k, _ in grid]
    for method in (methods or [None]):
        cfg_files = list(configs) + ([method_config(method)] if method else [])
        for values in itertools.product(*[v for _, v in grid]):
            for seed in seeds:
                grid_over = [f"{k}={v}" for k, v in zip(keys, values)]
                # name from the resolved method (a method file may set it), the grid values and the seed
                cfg = build_config(cfg_files, list(overrides) + grid_over + [f"seed={seed}"])
                grid_part = [f"{k}={_safe(v)}" for k, v in zip(keys, values)]
                name = "-".join([method_id(cfg.loss.method, cfg.boost_alpha), *grid_part, f"s{seed}"])
                run_dir = out / name
                job = Job(name, run_dir, cfg_files,
                          list(overrides) + grid_over + [f"seed={seed}", f"out={out}", f"run_name={name}"],
                          grid=dict(zip(keys, values)))
                if RunDir(run_dir).finished:
                    job.state = "done"
                elif RunDir(run_dir).started:
                    job.state = "resume"
                jobs.append(job)
    names = [j.name for j in jobs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two runs would share the directory name(s) {sorted(dup)[:3]}: give --methods with "
                         "distinct method names")
    return jobs


def _env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_jobs(jobs: list[Job], out: Path, n_parallel: int, features_dir: str | None,
             in_process: bool = False) -> list[Job]:
    """Run the jobs that are not done, ``n_parallel`` at a time; returns the jobs that failed.

    Each run is its own process (``python -m <trainer>``), or with ``in_process`` a call of the trainer's
    ``main()`` inside one of ``n_parallel`` long-lived worker processes, which saves the seconds of importing
    torch per run (what a head on cached features spends most of its time on). Worker processes use
    ``cpus // n_parallel`` torch threads each.
    """
    todo = [j for j in jobs if j.state != "done"]
    if in_process:
        return _run_in_pool(todo, out, n_parallel, features_dir)
    env = _env(n_parallel)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    running: list[tuple[Job, subprocess.Popen, float, object]] = []
    failed: list[Job] = []
    total, started = len(todo), 0
    while todo or running:
        while todo and len(running) < n_parallel:
            job = todo.pop(0)
            started += 1
            cmd = job.command(features_dir)
            print(f"[sweep] {started}/{total} {'resume' if job.state == 'resume' else 'start'} {job.name}", flush=True)
            if n_parallel == 1:
                # in the foreground: the trainer's own output goes to this terminal
                t0 = time.time()
                job.returncode = subprocess.run(cmd, env=env).returncode
                job.seconds = time.time() - t0
                _finished(job, failed)
                continue
            job.log = out / "logs" / f"{job.name}.log"
            fh = open(job.log, "w", encoding="utf-8")
            running.append((job, subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), time.time(), fh))
        still = []
        for job, proc, t0, fh in running:
            rc = proc.poll()
            if rc is None:
                still.append((job, proc, t0, fh))
                continue
            fh.close()
            job.returncode, job.seconds = rc, time.time() - t0
            _finished(job, failed)
        running = still
        if running:
            time.sleep(0.5)
    return failed


def _run_in_pool(todo: list[Job], out: Path, n_parallel: int, features_dir: str | None) -> list[Job]:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // n_parallel)
    failed: list[Job] = []
    # spawn, not fork: a forked worker would inherit this process's torch / OpenMP thread pools
    with ProcessPoolExecutor(max_workers=n_parallel, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_pool_worker_init, initargs=(threads,)) as pool:
        pending = {}
        for job in todo:
            job.log = out / "logs" / f"{job.name}.log"
            pending[pool.submit(_pool_run, features_dir, job.argv(features_dir), str(job.log))] = job
        for i, fut in enumerate(as_completed(pending), 1):
            job = pending[fut]
            job.returncode, job.seconds = fut.result()
            _finished(job, failed, f"{i}/{len(todo)} ")
    return failed


def _pool_worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _pool_run(features_dir: str | None, argv: list[str], log: str) -> tuple[int, float]:
    """One run inside a pool worker: the trainer's ``main(argv)``, its output in ``log``; (exit status, seconds)."""
    import contextlib
    import traceback

    if features_dir is not None:
        from .features import main as trainer_main
    else:
        from .main import main as trainer_main
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            rc = trainer_main(argv)
        except Exception:  # a failed run is reported and logged; the other runs go on
            traceback.print_exc()
            rc = 1
    return rc, time.time() - t0


def _finished(job: Job, failed: list[Job], count: str = "") -> None:
    ok = job.returncode == 0 and RunDir(job.run_dir).finished
    if ok:
        print(f"[sweep] {count}done {job.name} in {job.seconds:.0f} s", flush=True)
        return
    where = f" (log {job.log})" if job.log is not None and job.log.exists() and job.log.stat().st_size else ""
    print(f"[sweep] {count}FAILED {job.name} in {job.seconds:.0f} s (exit {job.returncode}){where}", flush=True)
    failed.append(job)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m largeloss.train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="trainer config (repeatable)")
    p.add_argument("--methods", nargs="+", default=[], metavar="M", help="add configs/methods/<M>.yaml per method")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of a config key (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="runs/sweep", help="parent of the run directories (default runs/sweep)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="run the trainer inside --jobs long-lived worker processes instead of one process per run "
                        "(saves importing torch per run; for heads on cached features)")
    p.add_argument("--features-dir", help="train heads on cached features (python -m largeloss.train.features train)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, start nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = p.parse_args(argv)
    from .config import ConfigError

    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    out = Path(args.out)
    try:
        grid = parse_grid(args.grid)
        jobs = plan_jobs(args.config, args.methods, grid, args.seeds, args.overrides, out)
    except (ValueError, ConfigError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    n_done = sum(j.state == "done" for j in jobs)
    print(f"[sweep] {len(jobs)} runs under {out}: {n_done} done, {sum(j.state == 'resume' for j in jobs)} to resume, "
          f"{sum(j.state == 'new' for j in jobs)} to start", flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"{j.state:6s} {j.run_dir}  {' '.join(j.command(args.features_dir)[1:])}")
        return 0
    failed = run_jobs(jobs, out, args.jobs, args.features_dir, in_process=args.in_process)
    from ..eval.tables import ReportError, datasets_table, render_markdown, sweep_table

    try:
        runs = [load_run(j.run_dir) for j in jobs if RunDir(j.run_dir).is_run()]
        if grid:
            keys = [k for k, _ in grid]
            for key in keys:
                print(render_markdown(sweep_table(runs, key, [k for k in keys if k != key])))
        elif any(r.finished for r in runs):
            print(render_markdown(datasets_table(runs)))
    except (ReportError, RunDirError) as e:
        print(f"sweep: report: {e}", file=sys.stderr)
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: " + ", ".join(j.name for j in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
