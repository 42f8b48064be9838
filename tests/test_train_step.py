"""The training step never waits on the host, and the throughput switches (issue 13, items 2 and 3).

On the CPU a sync cannot be observed, so the step runs with every host read of a tensor made by the project's
own code (``Tensor.item``, ``tolist``, ``cpu``, ``nonzero``, ``torch.nonzero``, ``bool``/``int``/``float``/
``index`` of a tensor) turned into an error; torch's own code (the optimiser reading its CPU step counter) is
not the project's and is left alone. On a GPU the step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, _compare_runs, read_metrics

from conftest import ROOT
from largeloss.ingest.cli import main as ingest_main
from largeloss.shards.labelstore import LabelStore
from largeloss.train.config import build_config
from largeloss.train.loop import (
    CorrectionBuffer,
    EpochStats,
    make_accelerator,
    make_optimizer,
    split_train_val,
    train_step,
)
from largeloss.train.losses import raise_problems
from largeloss.train.main import main as train_main
from largeloss.train.methods import method_state
from largeloss.train.model import build_model

K = 10  # the demo's classes

# (name, overrides) of the step variants: each method family, both ll_selection rules, the global top-k
STEPS = {
    "an": ["method=an"],
    "ll_ct official": ["method=ll_ct", "ll_selection=official", "delta_rel=10"],
    "ll_cp official": ["method=ll_cp", "ll_selection=official", "delta_rel=10"],
    "ll_cp exact_k": ["method=ll_cp", "ll_selection=exact_k", "delta_rel=10"],
    "ll_cp global official": ["method=ll_cp", "ll_selection=official", "delta_rel=10", "global_topk=true"],
    "ll_r global exact_k": ["method=ll_r", "ll_selection=exact_k", "delta_rel=10", "global_topk=true"],
    "ll_ct_abs": ["method=ll_ct_abs", "r0=1.0", "delta_abs=0.1"],
    "role": ["method=role"],
    "em_apl": ["method=em_apl", "apl_warmup=1"],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "data"
    assert ingest_main(["demo", "--out", str(d), "--n-train", "64", "--n-test", "24", "--no-progress"]) == 0
    return d


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test makes its own Accelerator (CPU or GPU, with or without bf16): Accelerate keeps one state per
    process, so it is reset around every test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class HostRead(AssertionError):
    pass


_PROJECT = ROOT.resolve()


def _project_caller() -> str | None:
    """``file:line`` of the caller of the patched function when it is the project's code (not tests/), else
    None."""
    frame = sys._getframe(2)
    path = Path(frame.f_code.co_filename).resolve()
    if path.is_relative_to(_PROJECT) and not path.is_relative_to(_PROJECT / "tests"):
        return f"{path.relative_to(_PROJECT)}:{frame.f_lineno}"
    return None


def _guard(name, original):
    def guarded(*args, **kwargs):
        where = _project_caller()
        if where is not None:
            raise HostRead(f"{name} of a tensor at {where}: a host sync inside the training step")
        return original(*args, **kwargs)
    return guarded


@contextlib.contextmanager
def no_host_reads():
    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            mp.setattr(torch.Tensor, name, _guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
        mp.setattr(torch, "nonzero", _guard("torch.nonzero", torch.nonzero))
        yield


class Setup:
    """One rank's step inputs on ``device``: small_cnn on the demo's 64 px images (random pixels), the training
    LabelStore (corrections in ``tmp``), the method's state, the precision tracker and LL-Cp's buffer."""

    def __init__(self, demo: Path, tmp: Path, overrides: list[str], device: str = "cpu"):
        cpu = ["cpu=true", "mixed_precision=no"] if device == "cpu" else ["mixed_precision=bf16"]
        self.cfg = cfg = build_config([ROOT / "configs/demo.yaml"], [f"data={demo}", "batch_size=8", "epochs=3",
                                                                     "flush_every=1000", *cpu, *overrides])
        self.accelerator = make_accelerator(cfg)
        torch.manual_seed(0)
        train_ids, _ = split_train_val(64, cfg)
        self.store = LabelStore(demo / "train" / "labels.arrow", K, cfg.protocol, seed=cfg.split_seed,
                                subset_ids=train_ids, corrections_dir=tmp / "labels")
        self.extra = method_state(cfg, self.store, train_ids)
        model = build_model("small_cnn", K, "none")
        groups = [{"params": list(model.parameters()), "lr": 1e-3}]
        if self.extra is not None and self.extra.module is not None:
            self.model, self.extra.module, self.optimizer = self.accelerator.prepare(
                model, self.extra.module, make_optimizer(cfg, groups + self.extra.param_groups()))
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, make_optimizer(cfg, groups))
        from largeloss.eval.analysis import PrecisionTracker
        from largeloss.train.hooks import Hooks

        self.precision = PrecisionTracker(self.store)
        self.buffer = CorrectionBuffer(self.store, cfg.flush_every, Hooks(None, self.accelerator)) \
            if cfg.loss.method == "ll_cp" else None
        self.stats = EpochStats(loss_sum=torch.zeros((), dtype=torch.float64, device=self.accelerator.device),
                                modified=torch.zeros((), dtype=torch.int64, device=self.accelerator.device))
        gen = torch.Generator().manual_seed(1)
        self.batches = [(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=gen),
                         torch.from_numpy(train_ids[8 * i: 8 * i + 8])) for i in range(3)]
        self.gather_fn = (lambda t: t) if cfg.loss.global_topk else None  # one rank: the identity

    def step(self, i: int, epoch: int = 2):
        inputs, ids = self.batches[i]
        return train_step(self.model, self.optimizer, inputs, ids, self.store, epoch, self.cfg, self.accelerator,
                          self.stats, frozen=False, gather_fn=self.gather_fn, extra=self.extra,
                          precision=self.precision, buffer=self.buffer)


def test_the_guard_catches_a_host_read_in_project_code():
    with no_host_reads(), pytest.raises(HostRead, match=r"Tensor.tolist of a tensor at train/losses.py:\d+"):
        raise_problems(torch.zeros(4, dtype=torch.int64))  # the deliberate sync of the deferred checks


@pytest.mark.parametrize("name", list(STEPS))
def test_step_makes_no_host_read(demo, tmp_path, name):
    s = Setup(demo, tmp_path, STEPS[name])
    with no_host_reads():
        outs = [s.step(i) for i in range(3)]
    assert s.stats.steps == 3 and s.stats.images == 24
    # out of the guard: what the step left on the device is what it computed
    assert s.stats.modified.dtype == torch.int64 and int(s.stats.modified) == sum(int(o.num_modified) for o in outs)
    assert float(s.stats.loss_sum) == sum(float(o.loss.detach()) for o in outs)
    raise_problems(s.stats.problems)
    method = s.cfg.loss.method
    if method in ("ll_ct", "ll_cp", "ll_r"):
        assert int(s.stats.modified) > 0  # epoch 2 of a top-k method modifies entries (k = ceil(80 * 10 %) = 8)
    rec = s.precision.end_epoch(2)
    counted = sum(int((o.corrections if method == "ll_cp" else o.modified).sum()) for o in outs)
    assert rec["num_modified"] == counted
    if s.buffer is not None:
        # the corrections waited on the device; the flush writes them to the epoch's log, in step order
        expected = [(int(ids[r]), int(c)) for o, (_, ids) in zip(outs, s.batches)
                    for r, c in zip(*np.nonzero(o.corrections.numpy()))]
        assert expected  # LL-Cp proposed corrections in epoch 2
        s.buffer.flush(2)
        s.store.flush_corrections(2)
        from largeloss.shards.corrections import LOG_RECORD, log_path

        rec = np.frombuffer(log_path(tmp_path / "labels", 2, 0).read_bytes()[16:], dtype=LOG_RECORD)
        assert list(zip(rec["sample"].tolist(), rec["cls"].tolist())) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the sync-debug-mode test of the "
                    "training step needs a GPU (the CPU tests above check the same step by another means)")
@pytest.mark.parametrize("name", list(STEPS))
def test_step_makes_no_sync_on_the_gpu(demo, tmp_path, name):
    s = Setup(demo, tmp_path, STEPS[name] + ["channels_last=true"], device="cuda")
    s.step(0)  # warm-up: cuBLAS / cuDNN handles and workspaces are made once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.step(1)
        s.step(2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert s.stats.steps == 3
    raise_problems(s.stats.problems)


def test_flush_every_changes_nothing(demo, tmp_path):
    """LL-Cp's corrections flushed after every step or once per epoch: the same metrics, result and label
    generations (byte for byte)."""
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=3", "ll_selection=official", "delta_rel=5",
            "analysis_entries=150", *TINY]
    assert train_main(base + ["run_name=each", "flush_every=1"]) == 0
    assert train_main(base + ["run_name=once", "flush_every=100000"]) == 0
    _compare_runs(tmp_path / "each", tmp_path / "once")
    m = read_metrics(tmp_path / "once")
    assert [r["modified"] for r in m][0] == 0 and all(r["modified"] > 0 for r in m[1:])
    assert [r["num_modified_cum"] for r in m] == [r["num_modified_cum"] for r in read_metrics(tmp_path / "each")]
    gens = sorted(p.name for p in (tmp_path / "once" / "labels").glob("gen-*"))
    assert gens == ["gen-0003"]  # only the newest checkpoint's generation is kept
    meta = json.loads((tmp_path / "once" / "labels" / "gen-0003" / "meta.json").read_text())
    assert meta["num_corrections"] == m[-1]["num_modified_cum"] > 0  # each correction once, counted once


# ---------------------------------------------------------------------------------------- item 3: switches


def test_channels_last_reaches_the_convolutions(demo, tmp_path, monkeypatch):
    """channels_last=true: the model's weights and the images every convolution sees, in training and in
    evaluation, are channels-last; the default leaves both as they were."""
    seen = []
    conv_forward = torch.nn.Conv2d.forward

    def record(self, x):
        seen.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                     self.weight.is_contiguous(memory_format=torch.channels_last)))
        return conv_forward(self, x)

    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_ct.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=1", *TINY]
    monkeypatch.setattr(torch.nn.Conv2d, "forward", record)
    assert train_main(base + ["run_name=nchw"]) == 0
    assert seen and not any(x or w for x, w in seen)
    seen.clear()
    assert train_main(base + ["run_name=nhwc", "channels_last=true"]) == 0
    assert seen and all(x and w for x, w in seen)


def test_channels_last_computes_the_same_logits():
    torch.manual_seed(0)
    model = build_model("small_cnn", K, "none")
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    plain = model(images)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(images), plain, rtol=1e-4, atol=1e-5)


def _inductor_unavailable() -> str | None:
    try:
        torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(3))
    except Exception as e:  # no C++ compiler, or an inductor that cannot build here
        return f"torch.compile (inductor) cannot compile on this machine: {type(e).__name__}: {str(e)[:200]}"
    return None


def test_compile_trains_the_compiled_model(demo, tmp_path):
    """compile=true: Accelerate compiles the prepared model, the step runs the compiled graph, and its loss and
    gradients agree with the eager model's."""
    reason = _inductor_unavailable()
    if reason:
        pytest.skip(reason)
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_compiled_module

    steps = {}
    for mode in ("false", "true"):
        AcceleratorState._reset_state(True)
        s = Setup(demo, tmp_path / mode, ["method=ll_ct", "delta_rel=10", f"compile={mode}"])
        assert is_compiled_module(s.model) == (mode == "true")
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        out = s.step(0)
        frames = counters["stats"]["unique_graphs"]
        assert (frames > 0) == (mode == "true")  # the compiled model is what ran
        grads = torch.cat([p.grad.flatten() for p in s.accelerator.unwrap_model(s.model).parameters()])
        steps[mode] = (float(out.loss.detach()), out.modified.clone(), grads)
    assert steps["true"][0] == pytest.approx(steps["false"][0], rel=1e-5)
    assert torch.equal(steps["true"][1], steps["false"][1])
    assert torch.allclose(steps["true"][2], steps["false"][2], rtol=1e-4, atol=1e-6)


def test_compile_in_a_run_keeps_the_weights_files_plain(demo, tmp_path):
    """A whole run with compile=true: trained, tested with its best weights, which are saved under the model's
    own keys (the compiled wrapper would prefix them with ``_orig_mod.``), as the pointing game reads them."""
    reason = _inductor_unavailable()
    if reason:
        pytest.skip(reason)
    from safetensors.torch import load_file

    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/an.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=1", "max_steps_per_epoch=2", "run_name=c", "compile=true",
            *TINY]
    assert train_main(base) == 0
    assert json.loads((tmp_path / "c" / "result.json").read_text())["best_epoch"] == 1
    keys = [k for f in (tmp_path / "c" / "checkpoints" / "best").glob("*.safetensors") for k in load_file(f)]
    assert "head.weight" in keys and not any(k.startswith("_orig_mod.") for k in keys)


def test_bf16_backbone_gives_float32_logits_in_the_step(demo, tmp_path):
    """mixed_precision=bf16 on the CPU: under the step's autocast the backbone computes in bf16 and the logits
    that reach the loss are float32 (train/model.py MultiLabelNet.classify)."""
    cfg = build_config([ROOT / "configs/demo.yaml"], [f"data={demo}", "cpu=true", "mixed_precision=bf16"])
    accelerator = make_accelerator(cfg)
    model = accelerator.prepare(build_model("small_cnn", K, "none"))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with accelerator.autocast():
        fmap = model.features(images)
        logits = model(images)
    assert fmap.dtype == torch.bfloat16 and logits.dtype == torch.float32
