"""eval.analysis: memorisation tracker (Table 1 / Figure 1) and precision of modification (Figure 4),
and their tables in the report."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from largeloss.eval import report
from largeloss.eval.analysis import (
    STATE_NAME,
    MemorizationTracker,
    PrecisionTracker,
    bce_with_logits,
    corrections_precision,
    entry_types,
)
from largeloss.shards.format import sample_key
from largeloss.shards.labels import label_schema
from largeloss.shards.labelstore import LabelStore
from largeloss.train.losses import LossConfig, compute_loss


def sp(x: float) -> float:
    """softplus(x) = log(1 + e^x): the BCE of logit x against target 0 (and of -x against target 1)."""
    return math.log1p(math.exp(x))


class FakeStore:
    """The two LabelStore methods the trackers use, over fixed dense arrays (rows = sample ids)."""

    def __init__(self, target, unknown, truth):
        self.t = np.asarray(target, np.float32)
        self.u = np.asarray(unknown, bool)
        self.truth = np.asarray(truth, np.int8)
        self.num_classes = self.t.shape[1]
        self.truth_reads = 0

    def targets(self, ids):
        ids = np.asarray(ids)
        return torch.from_numpy(self.t[ids].copy()), torch.from_numpy(self.u[ids].copy())

    def truth_for_analysis(self, ids):
        self.truth_reads += 1
        return self.truth[np.asarray(ids)]


T, F = True, False
# 4 samples x 3 classes. Types (TP observed positive; TN/FN unobserved and truly negative/positive; "-"
# the observed negative of sample 2, class 0, which takes no part):
#   sample 0: TP FN TN      sample 1: TN TP TN      sample 2: -  TN TP      sample 3: TP FN FN
TARGET = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
UNKNOWN = [[F, T, T], [T, F, T], [F, T, F], [F, T, T]]
TRUTH = [[1, 1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]]
TYPES = [[0, 2, 1], [1, 0, 1], [-1, 1, 0], [0, 2, 2]]
TP_E = {(0, 0), (1, 1), (2, 2), (3, 0)}
TN_E = {(0, 2), (1, 0), (1, 2), (2, 1)}
FN_E = {(0, 1), (3, 1), (3, 2)}


def store():
    return FakeStore(TARGET, UNKNOWN, TRUTH)


def tracked(tr):
    return {name: {(int(s), int(c)) for s, c, t in zip(tr.sample, tr.cls, tr.type) if t == code}
            for code, name in enumerate(("TP", "TN", "FN"))}


def test_entry_types_and_bce():
    assert entry_types(np.array(TARGET), np.array(UNKNOWN), np.array(TRUTH)).tolist() == TYPES
    # BCE on logits: x = 0 -> ln 2 for either target; x = 2, y = 0 -> ln(1 + e^2) = 2.126928...;
    # x = -3, y = 1 -> ln(1 + e^3)
    got = bce_with_logits([0.0, 0.0, 2.0, -3.0], [0.0, 1.0, 0.0, 1.0])
    assert got == pytest.approx([math.log(2), math.log(2), 2.1269280110429727, 3.048587351573742], abs=1e-12)
    x = torch.tensor([[-40.0, -1.5, 0.3, 25.0]])
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    assert bce_with_logits(x.numpy(), y.numpy()) == pytest.approx(ref.numpy(), rel=1e-12)


def test_draw_is_stratified_and_takes_all_of_a_rare_type(tmp_path):
    # 9 entries: quotas TP 3, FN 3, TN 3. There are 4 TP, 4 TN and 3 FN: every FN is taken, 3 of 4 of the others.
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 9, seed=5, out_dir=tmp_path)
    got = tracked(tr)
    assert got["FN"] == FN_E
    assert len(got["TP"]) == 3 and got["TP"] <= TP_E
    assert len(got["TN"]) == 3 and got["TN"] <= TN_E
    # same arguments -> the same draw; another seed may pick others but never more than the quota
    assert tracked(MemorizationTracker(store(), [0, 1, 2, 3], 9, seed=5, out_dir=tmp_path)) == got
    # more than there is: everything typed (11 entries; the observed negative (2, 0) is not)
    everything = MemorizationTracker(store(), [3, 1, 2, 0, 1], 30, seed=0, out_dir=tmp_path)
    assert tracked(everything) == {"TP": TP_E, "TN": TN_E, "FN": FN_E}
    assert everything.image_ids.tolist() == [0, 1, 2, 3]
    # only the images given are candidates
    only1 = MemorizationTracker(store(), [1], 30, seed=0, out_dir=tmp_path)
    assert tracked(only1) == {"TP": {(1, 1)}, "TN": {(1, 0), (1, 2)}, "FN": set()}
    with pytest.raises(ValueError, match="num_entries"):
        MemorizationTracker(store(), [0], 2, seed=0, out_dir=tmp_path)


def logits_for(epoch: int) -> np.ndarray:
    """Logits [4, 3] of the three epochs of the Table 1 test (see there)."""
    if epoch == 1:
        return np.zeros((4, 3))
    if epoch == 2:
        return np.array([[1, 1, -1], [-1, 1, -1], [0, -1, 1], [1, 1, -2]], float)
    return np.array([[2, -3, -2], [3, 2, -2], [0, -2, -3], [2, -3, -3]], float)


def test_table1_by_hand(tmp_path):
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path / "analysis")
    # Epoch 1: every logit 0 -> every loss ln 2 = 0.6931.
    # Epoch 2: TP logit +1 -> sp(-1) = 0.3133; TN logit -1 -> sp(-1) = 0.3133; FN (0,1), (3,1) logit +1 ->
    #   sp(1) = 1.3133 (their peak so far), FN (3,2) logit -2 -> sp(-2) = 0.1269.
    # Epoch 3: TP (2,2) logit -3 -> sp(3) = 3.0486 (a late peak), other TP logit 2 -> sp(-2); TN (1,0) logit 3 ->
    #   sp(3) = 3.0486 (late peak), other TN logit -2 -> sp(-2); FN logit -3 -> sp(-3) = 0.0486.
    # Peaks: TP 3 x epoch 1 + (2,2) at 3 -> 75 / 25; TN 3 x epoch 1 + (1,0) at 3 -> 75 / 25;
    #        FN (3,2) at 1, (0,1) and (3,1) at 2 -> 33.3 / 66.7.
    for epoch in (1, 2, 3):
        # the batch order does not matter; sample 2 comes first here
        n = tr.update(epoch, torch.tensor([2, 0, 3, 1]), torch.tensor(logits_for(epoch)[[2, 0, 3, 1]]))
        assert n == 11
    s = tr.finish(title="hand")
    t = s["table"]
    assert (t["TP"]["n"], t["TP"]["warmup"], t["TP"]["regular"]) == (4, 3, 1)
    assert (t["TN"]["n"], t["TN"]["warmup"], t["TN"]["regular"]) == (4, 3, 1)
    assert (t["FN"]["n"], t["FN"]["warmup"], t["FN"]["regular"]) == (3, 1, 2)
    assert t["FN"]["warmup_pct"] == pytest.approx(100 / 3) and t["FN"]["regular_pct"] == pytest.approx(200 / 3)
    assert t["TP"]["peak_epoch_hist"] == {"1": 3, "2": 0, "3": 1}
    assert t["FN"]["peak_epoch_hist"] == {"1": 1, "2": 2, "3": 0}
    # mean loss of FN in epoch 2: (sp(1) + sp(1) + sp(-2)) / 3; of TP in epoch 3: (3 sp(-2) + sp(3)) / 4
    assert s["mean_loss"]["FN"][1] == pytest.approx((2 * sp(1) + sp(-2)) / 3)
    assert s["mean_loss"]["TP"][2] == pytest.approx((3 * sp(-2) + sp(3)) / 4)
    assert s["mean_loss"]["TN"][0] == pytest.approx(math.log(2))
    out = tmp_path / "analysis"
    assert json.loads((out / "memorization.json").read_text())["table"] == t
    md = (out / "table1.md").read_text().splitlines()
    assert md[2] == "| Highest loss phase | TP | TN | FN |"
    assert md[4] == "| Warmup (epoch 1) | 75.0 | 75.0 | 33.3 |"
    assert md[5] == "| Regular (epoch > 1) | 25.0 | 25.0 | 66.7 |"
    assert md[6] == "| entries | 4 | 4 | 3 |"
    assert (out / "memorization.png").stat().st_size > 10_000
    with np.load(out / STATE_NAME) as z:
        assert z["loss"].shape == (11, 3) and z["epochs"].tolist() == [1, 2, 3]


def test_updates_average_ties_go_to_epoch_1_and_missing_entries(tmp_path):
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path)
    # two updates of the same samples in epoch 1 are averaged: logits 0 and 2 against target 0 -> (ln 2 + sp(2)) / 2
    tr.update(1, [0], np.zeros((1, 3)))
    tr.update(1, [0], np.full((1, 3), 2.0))
    tr.update(1, [1, 2, 3], np.zeros((3, 3)))
    epochs, loss = tr.loss_matrix()
    e = [i for i, (s, c) in enumerate(zip(tr.sample, tr.cls)) if (s, c) == (0, 2)][0]
    assert loss[e, 0] == pytest.approx((math.log(2) + sp(2)) / 2)
    # epoch 2 = epoch 1 exactly for samples 1..3 (ties: the earliest epoch wins); sample 0 is not scored
    tr.update(2, [1, 2, 3], np.zeros((3, 3)))
    t = tr.summary()["table"]
    assert t["TN"]["regular"] == 0 and t["TN"]["n"] == 3 and t["TN"]["incomplete"] == 1  # (0, 2) lacks epoch 2
    assert t["FN"]["incomplete"] == 1 and t["TP"]["incomplete"] == 1
    with pytest.raises(ValueError, match="logits shape"):
        tr.update(2, [1], np.zeros((1, 4)))
    with pytest.raises(RuntimeError, match="not scored"):
        tr.score_epoch(3, lambda ids: (ids[:2], np.zeros((2, 3))))


def test_epoch_1_required_and_resume(tmp_path):
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path)
    tr.update(2, [0, 1, 2, 3], np.zeros((4, 3)))
    with pytest.raises(ValueError, match="epoch 1 was not recorded"):
        tr.summary()
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path)
    for epoch in (1, 2, 3):
        tr.score_epoch(epoch, lambda ids, epoch=epoch: (ids, logits_for(epoch)[ids]))
    # a run resumed after epoch 2 keeps epochs 1 and 2 of the saved state, exactly
    again = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path, resume_after_epoch=2)
    assert again.epochs == [1, 2]
    assert np.array_equal(again.loss_matrix()[1], tr.loss_matrix()[1][:, :2])
    with pytest.raises(ValueError, match="tracks other entries"):
        MemorizationTracker(store(), [0, 1, 2, 3], 9, seed=1, out_dir=tmp_path, resume_after_epoch=2)


# ----------------------------------------------------------------- the real LabelStore: truth stays out


def write_labels(path, pos, unlisted="negative", neg=None):
    n = len(pos)
    neg = neg or [[] for _ in range(n)]
    schema = label_schema(unlisted)
    batch = pa.record_batch([pa.array(np.arange(n, dtype=np.uint32), pa.uint32()),
                             pa.array([sample_key(i) for i in range(n)], pa.string()),
                             pa.array(pos, pa.list_(pa.uint16())), pa.array(neg, pa.list_(pa.uint16()))], schema=schema)
    with ipc.new_file(str(path), schema) as w:
        w.write_batch(batch)
    return path


def test_loss_path_never_reads_truth(tmp_path, monkeypatch):
    # 6 images x 4 classes, complete truth; single positive protocol: one positive per image observed
    pos = [[0, 1], [1, 2, 3], [2], [0, 3], [1], [0, 1, 2, 3]]
    st = LabelStore(write_labels(tmp_path / "l.arrow", pos), 4, "single_positive")
    tr = MemorizationTracker(st, np.arange(6), 12, seed=3, out_dir=tmp_path / "a")
    precision = PrecisionTracker(st)
    assert len(tracked(tr)["FN"]) == 4  # the quota 12 // 3, of the 13 - 6 = 7 hidden positives
    target, unknown = st.targets(np.arange(6))

    def forbidden(*a, **k):
        raise AssertionError("truth read on the training path")

    monkeypatch.setattr(st, "truth_for_analysis", forbidden)
    ids = torch.arange(6)
    t, u = st.targets(ids)
    assert torch.equal(t, target) and torch.equal(u, unknown)
    logits = torch.linspace(-2, 3, 24).view(6, 4)
    out = compute_loss(logits, t, u, 2, LossConfig(method="ll_ct", delta_rel=10.0))
    assert out.num_modified == 3  # ceil(24 * 10 % * (2 - 1)) = ceil(2.4)
    assert tr.update(1, ids, logits) == 12
    # every tracked FN entry's loss is against target 0 (AN), not against its true 1: sp(logit)
    _, loss = tr.loss_matrix()
    for e in np.flatnonzero(tr.type == 2):
        assert loss[e, 0] == pytest.approx(sp(float(logits[tr.sample[e], tr.cls[e]])))
    # the precision tracker is analysis and does read truth: only there
    with pytest.raises(AssertionError, match="truth read"):
        precision.update(2, ids, out.modified)


# ---------------------------------------------------------------------------------- precision tracker


def test_precision_by_hand():
    # truth rows as in TRUTH plus a row of unknown truth (OpenImages-like)
    st = FakeStore(TARGET + [[0, 0, 0]], UNKNOWN + [[T, T, T]], TRUTH + [[0, 0, 0]])
    pt = PrecisionTracker(st)
    assert pt.end_epoch(1) == {"num_modified": 0, "num_modified_true": 0, "num_modified_truth_unknown": 0,
                               "precision_modified": None, "num_modified_cum": 0, "num_modified_true_cum": 0,
                               "num_modified_truth_unknown_cum": 0, "precision_modified_cum": None}
    # epoch 2: (0,1) FN, (3,2) FN, (1,0) TN modified -> 2 / 3
    pt.update(2, [0, 1], [[F, T, F], [T, F, F]])
    pt.update(2, [3], [[F, F, T]])
    r = pt.end_epoch(2)
    assert (r["num_modified"], r["num_modified_true"]) == (3, 2)
    assert r["precision_modified"] == pytest.approx(2 / 3) and r["precision_modified_cum"] == pytest.approx(2 / 3)
    # epoch 3: (3,1) FN and (4,0) truth unknown -> 1 / 1 this epoch; cumulative 3 true of 5, 1 unknown -> 3 / 4
    pt.update(3, torch.tensor([3, 4]), torch.tensor([[F, T, F], [T, F, F]]))
    with pytest.raises(ValueError, match="epoch 3 is open"):
        pt.update(4, [0], [[F, F, F]])
    r = pt.end_epoch(3)
    assert r["precision_modified"] == 1.0 and r["num_modified_truth_unknown"] == 1
    assert (r["num_modified_cum"], r["num_modified_true_cum"], r["num_modified_truth_unknown_cum"]) == (5, 3, 1)
    assert r["precision_modified_cum"] == pytest.approx(0.75)
    # several processes: the counts are summed by `reduce` before anything is derived (here: 2 equal ranks)
    pt.update(4, [0], [[F, T, T]])  # (0,1) FN, (0,2) TN
    r = pt.end_epoch(4, reduce=lambda c: c * 2)
    assert (r["num_modified"], r["num_modified_true"], r["precision_modified"]) == (4, 2, 0.5)
    assert r["num_modified_cum"] == 9 and r["precision_modified_cum"] == pytest.approx(5 / 8)
    assert [h["epoch"] for h in pt.history] == [1, 2, 3, 4]


def test_corrections_precision_of_ll_cp_generation(tmp_path):
    pos = [[0, 1], [1, 2, 3], [2], [0, 3]]
    st = LabelStore(write_labels(tmp_path / "l.arrow", pos), 4, "single_positive", corrections_dir=tmp_path / "c")
    assert corrections_precision(st)["precision_corrections"] is None
    t, u = st.targets(np.arange(4))
    unknown = [(s, c) for s in range(4) for c in range(4) if bool(u[s, c])]
    hidden = [(s, c) for s, c in unknown if c in pos[s]]  # the 4 unobserved true positives
    wrong = [(s, c) for s, c in unknown if c not in pos[s]][:2]
    pairs = hidden[:3] + wrong
    st.append_corrections(1, [s for s, _ in pairs], [c for _, c in pairs])
    st.flush_corrections(1)
    st.use_generation(st.merge_corrections(1, 1))
    got = corrections_precision(st)
    assert got == {"num_corrections": 5, "num_corrections_true": 3, "num_corrections_truth_unknown": 0,
                   "precision_corrections": 0.6}
    # the memorisation draw types entries by the protocol's labels: it refuses a store with corrections in use
    with pytest.raises(ValueError, match="before LabelStore.use_generation"):
        MemorizationTracker(st, np.arange(4), 9, seed=0, out_dir=tmp_path / "m")


# ------------------------------------------------------------------------------------- report tables


def fake_run(root, name, method, seed, precision=None, memo=None, dataset="voc2012"):
    import yaml

    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"dataset": dataset, "method": method, "seed": seed}))
    rows = []
    for e, p in enumerate(precision or [None, None], start=1):
        key = "precision_modified_cum" if method == "ll_cp" else "precision_modified"
        rows.append(json.dumps({"epoch": e, "val_map": 0.5, key: p}))
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    if memo is not None:
        (d / "analysis").mkdir()
        table = {t: {"n": n, "warmup_pct": w, "regular_pct": 100 - w} for t, (n, w) in memo.items()}
        (d / "analysis" / "memorization.json").write_text(json.dumps({"table": table}))
    return d


def test_report_tables_and_precision_plot(tmp_path, capsys):
    # precision (Figure 4): LL-Ct seeds 0/1 at epoch 2: 0.80 and 0.90 -> 85.0 ± 7.1 (sqrt(0.005) = 0.0707);
    # LL-Cp reads the accumulated column
    fake_run(tmp_path, "ct0", "ll_ct", 0, precision=[None, 0.80, 0.60])
    fake_run(tmp_path, "ct1", "ll_ct", 1, precision=[None, 0.90, 0.70])
    fake_run(tmp_path, "cp0", "ll_cp", 0, precision=[None, 0.95, 0.93])
    # Table 1: Naive AN, two seeds: FN warmup 20 % and 30 % -> 25.0 ± 7.1
    memo = {"TP": (10, 90.0), "TN": (10, 80.0), "FN": (5, 20.0)}
    fake_run(tmp_path, "an0", "an", 0, memo=memo)
    fake_run(tmp_path, "an1", "an", 1, memo={**memo, "FN": (5, 30.0)})
    assert report.main([str(tmp_path), "--plot-precision", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("### Distribution of the highest loss occurrence (paper Table 1 layout)")
    assert out[i + 2] == "| Method / highest loss phase | TP | TN | FN | entries (TP / TN / FN) |"
    assert out[i + 4] == ("| Naive AN: warmup (epoch 1) | 90.0 ± 0.0 (2 seeds) | 80.0 ± 0.0 (2 seeds) "
                          "| 25.0 ± 7.1 (2 seeds) | 20 / 20 / 10 |")
    assert out[i + 5] == ("| Naive AN: regular (epoch > 1) | 10.0 ± 0.0 (2 seeds) | 20.0 ± 0.0 (2 seeds) "
                          "| 75.0 ± 7.1 (2 seeds) | 20 / 20 / 10 |")
    j = out.index("### Precision of modification (paper Figure 4 data)")
    assert out[j + 2] == "| Method | epoch 2 | epoch 3 |"
    assert out[j + 4] == "| LL-Ct | 85.0 ± 7.1 (2 seeds) | 65.0 ± 7.1 (2 seeds) |"
    assert out[j + 5] == "| LL-Cp (accumulated) | 95.0 | 93.0 |"
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_predict_logits_and_score_epoch_with_a_model(tmp_path):
    class Net(torch.nn.Module):
        """logit[b, c] = mean pixel of image b * (c + 1) - 1: a training-mode flag that must be off when scoring."""

        def forward(self, images):
            assert not self.training
            m = images.float().mean(dim=(1, 2, 3))
            return m[:, None] * torch.arange(1.0, 4.0)[None, :] - 1.0

    net = Net().train()
    # sample ids 3, 0 | 2, 1 in two batches; image of sample i is filled with i (mean pixel i)
    loader = [(torch.full((2, 3, 2, 2), 0, dtype=torch.uint8).index_fill_(0, torch.tensor([0]), 3),
               torch.tensor([3, 0])),
              (torch.stack([torch.full((3, 2, 2), 2, dtype=torch.uint8), torch.full((3, 2, 2), 1, dtype=torch.uint8)]),
               torch.tensor([2, 1]))]
    tr = MemorizationTracker(store(), [0, 1, 2, 3], 30, seed=0, out_dir=tmp_path)
    from largeloss.eval.analysis import predict_logits

    tr.score_epoch(1, lambda image_ids: predict_logits(net, loader))
    assert net.training  # restored
    _, loss = tr.loss_matrix()
    # FN (3, 2): target 0, logit 3 * 3 - 1 = 8 -> sp(8); TP (1, 1): target 1, logit 1 * 2 - 1 = 1 -> sp(-1)
    at = {(int(s), int(c)): i for i, (s, c) in enumerate(zip(tr.sample, tr.cls))}
    assert loss[at[(3, 2)], 0] == pytest.approx(sp(8.0))
    assert loss[at[(1, 1)], 0] == pytest.approx(sp(-1.0))
    assert (tmp_path / STATE_NAME).is_file()
