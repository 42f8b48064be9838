"""ingest/cli.py: the adapter registry, and every sub-command's options reaching its adapter's ``plan``."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest

from largeloss.ingest import cli, coco, cub, demo, nuswide, openimages, voc
from largeloss.shards.format import IngestError


def test_registry_order_is_the_help_order():
    assert list(cli.ADAPTERS) == ["voc", "coco", "nuswide", "cub", "openimages", "demo"]
    assert all(name == mod.NAME for name, mod in cli.ADAPTERS.items())


@pytest.mark.parametrize("argv, module, want", [
    (["voc", "--root", "R", "--year", "2007", "--classes", "C", "--split-lists", "train=trainval,test=test",
      "--dataset", "d", "--strict"], voc,
     {"root": Path("R"), "year": 2007, "folder": None, "classes_file": Path("C"),
      "split_lists": {"train": "trainval", "test": "test"}, "dataset": "d", "strict": True}),
    (["coco", "--root", "R", "--keep-empty", "--strict"], coco,
     {"root": Path("R"), "year": "2014", "keep_empty": True, "strict": True}),
    (["nuswide", "--from-npy", "N"], nuswide,
     {"root": None, "from_npy": Path("N"), "images": None, "drop_no_positive": False}),
    (["nuswide", "--root", "R", "--drop-no-positive"], nuswide,
     {"root": Path("R"), "from_npy": None, "images": None, "drop_no_positive": True}),
    (["cub", "--root", "R"], cub, {"root": Path("R"), "strict": False}),
    (["openimages", "--splits", "test", "--images", "I"], openimages,
     {"root": Path("."), "images": Path("I"), "splits": "test", "strict": False}),
    (["demo", "--n-test", "7", "--size", "80", "--workers", "3", "--no-progress"], demo,
     {"n_train": 2000, "n_test": 7, "seed": 0, "size": 80, "tree": None, "out": Path("O"), "progress": False}),
])
def test_options_reach_plan_as_keywords(argv, module, want, monkeypatch, capsys):
    """The adapter's own options by dest, plus the common ones its plan names (out, workers, strict, progress)."""
    calls = []

    @functools.wraps(module.plan)  # the same signature, which the CLI reads
    def fake(*args, **kwargs):
        inspect.signature(fake).bind(*args, **kwargs)  # the real plan would accept this call
        calls.append((args, kwargs))
        raise IngestError("stopped")

    monkeypatch.setattr(module, "plan", fake)
    assert cli.main([*argv, "--out", "O"]) == 1
    assert calls == [((), want)]
    assert capsys.readouterr().err == f"ingest {argv[0]}: error: stopped\n"
