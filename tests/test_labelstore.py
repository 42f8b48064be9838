"""LabelStore: batch targets under each protocol, truth for analysis, and LL-Cp correction generations."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

import largeloss.shards.corrections as corrections_module
from largeloss.shards.corrections import current_generation, list_generations, log_path
from largeloss.shards.format import sample_key
from largeloss.shards.labels import SparseLabels, label_schema
from largeloss.shards.labelstore import LabelStore
from largeloss.shards.protocols import observe

K = 5
# 4 samples x 5 classes. As truth with unlisted=unknown (OpenImages-like), dense:
#   row 0: [+1 -1  0 +1  0]
#   row 1: [-1  0  0  0 -1]
#   row 2: [ 0  0 +1  0  0]
#   row 3: [ 0 +1 -1  0 +1]
POS = [[0, 3], [], [2], [1, 4]]
NEG = [[1], [0, 4], [], [2]]
T, F = True, False


def write_labels(path, pos, neg, unlisted):
    schema = label_schema(unlisted)
    n = len(pos)
    batch = pa.record_batch(
        [
            pa.array(np.arange(n, dtype=np.uint32), pa.uint32()),
            pa.array([sample_key(i) for i in range(n)], pa.string()),
            pa.array(pos, pa.list_(pa.uint16())),
            pa.array(neg, pa.list_(pa.uint16())),
        ],
        schema=schema,
    )
    with ipc.new_file(str(path), schema) as w:
        w.write_batch(batch)
    return path


@pytest.fixture
def unk_file(tmp_path):
    return write_labels(tmp_path / "unk.arrow", POS, NEG, "unknown")


@pytest.fixture
def neg_file(tmp_path):
    return write_labels(tmp_path / "neg.arrow", POS, NEG, "negative")


def lists(t: torch.Tensor):
    return t.to(torch.int64).tolist()


# ------------------------------------------------------------------------- targets


def test_given_on_partial_truth(unk_file):
    store = LabelStore(unk_file, K, "given")
    target, unknown = store.targets([0, 1, 2, 3])
    assert target.dtype == torch.float32 and unknown.dtype == torch.bool
    assert lists(target) == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1]]
    # unknown = neither observed positive nor observed negative; observed negatives are never unknown
    assert unknown.tolist() == [[F, F, T, F, T], [F, T, T, T, F], [T, T, F, T, T], [T, F, F, T, F]]
    t2, u2 = store.targets(torch.tensor([3, 3, 0]))  # any order, repeats allowed
    assert lists(t2) == [[0, 1, 0, 0, 1], [0, 1, 0, 0, 1], [1, 0, 0, 1, 0]]
    assert u2.tolist() == [[T, F, F, T, F], [T, F, F, T, F], [F, F, T, F, T]]
    assert store.targets([])[0].shape == (0, K)
    with pytest.raises(IndexError, match="unk.arrow: sample id 4 out of range 0..3"):
        store.targets([1, 4])


@pytest.mark.parametrize("protocol", ["full", "given"])
def test_complete_truth_has_no_unknowns(neg_file, protocol):
    store = LabelStore(neg_file, K, protocol)
    target, unknown = store.targets([0, 1, 2, 3])
    assert lists(target) == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1]]
    assert not unknown.any()
    assert store.known_per_class().tolist() == [4, 4, 4, 4, 4]


def test_single_positive_targets(neg_file):
    store = LabelStore(neg_file, K, "single_positive")
    target, unknown = store.targets([0, 1, 2, 3])
    # RandomState(1200): row 0 shuffles [0 3] -> keeps 0, then its 3 negatives; row 1 has no positive;
    # row 2 has only 2; row 3 shuffles [1 4] -> keeps 4 (checked against the dense reference in
    # test_protocols.py). Everything else is unknown.
    assert lists(target) == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    assert (unknown == (target == 0)).all()
    assert store.known_per_class().tolist() == [1, 0, 1, 0, 1]
    # truth stays reachable for analysis only, complete (-1 for unlisted)
    assert store.truth_for_analysis([0, 3]).tolist() == [[1, -1, -1, 1, -1], [-1, 1, -1, -1, 1]]
    assert store.truth_for_analysis([0]).dtype == np.int8


@pytest.mark.parametrize("protocol", ["given", "partial:0.5", "partial:0.2"])
def test_targets_follow_observed_labels(tmp_path, protocol):
    gen = np.random.default_rng(0)
    dense = gen.choice(np.array([1, -1, 0], dtype=np.int8), size=(50, 7), p=[0.2, 0.3, 0.5])
    pos = [np.flatnonzero(r == 1).tolist() for r in dense]
    neg = [np.flatnonzero(r == -1).tolist() for r in dense]
    path = write_labels(tmp_path / "l.arrow", pos, neg, "unknown")
    store = LabelStore(path, 7, protocol, seed=3)
    obs = observe(SparseLabels.from_dense(dense, "unknown"), protocol, seed=3).dense(range(50))
    ids = gen.permutation(50)[:20]
    target, unknown = store.targets(ids)
    assert (target.numpy() == (obs[ids] == 1)).all() and (unknown.numpy() == (obs[ids] == 0)).all()
    assert (store.truth_for_analysis(ids) == dense[ids]).all()


def test_known_per_class_and_subset(unk_file):
    # class 0: rows 0 (+), 1 (-); class 1: 0 (-), 3 (+); class 2: 2 (+), 3 (-); class 3: 0; class 4: 1, 3
    assert LabelStore(unk_file, K, "given").known_per_class().tolist() == [2, 2, 2, 1, 2]
    sub = LabelStore(unk_file, K, "given", subset_ids=[2, 0])
    assert sub.sample_ids.tolist() == [0, 2]
    assert sub.known_per_class().tolist() == [1, 1, 1, 1, 0]
    # the subset restricts nothing in targets: samples outside it read exactly as without a subset
    full = LabelStore(unk_file, K, "given")
    for a, b in zip(sub.targets([1, 3]), full.targets([1, 3])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="duplicate"):
        LabelStore(unk_file, K, "given", subset_ids=[1, 1])


def test_single_positive_is_independent_of_subset(neg_file):
    # the protocol runs over the whole file before the cut: a sample's positive is the same in any subset
    a = LabelStore(neg_file, K, "single_positive", subset_ids=[3])
    b = LabelStore(neg_file, K, "single_positive")
    assert torch.equal(a.targets([3])[0], b.targets([3])[0])


# --------------------------------------------------------------------- corrections


def corrections(store):
    s, c = store.corrections_for_analysis()
    return list(zip(s.tolist(), c.tolist()))


def test_corrections_take_effect_after_merge_and_use(unk_file, tmp_path):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    before = store.targets([0, 1, 2, 3])
    assert store.generation == -1 and current_generation(d) == -1
    store.append_corrections(1, [0, 2], [2, 0])
    assert all(torch.equal(x, y) for x, y in zip(store.targets([0, 1, 2, 3]), before))
    store.flush_corrections(1)
    gen = store.merge_corrections(1, world_size=1)
    assert gen == 1 and current_generation(d) == 1 and list_generations(d) == [1]
    # still the old state until use_generation (the rest of epoch 1 trains on it)
    assert all(torch.equal(x, y) for x, y in zip(store.targets([0, 1, 2, 3]), before))
    store.use_generation(gen)
    target, unknown = store.targets([0, 2])
    assert lists(target) == [[1, 0, 1, 1, 0], [1, 0, 1, 0, 0]]
    assert unknown.tolist() == [[F, F, F, F, T], [F, T, F, T, T]]
    assert corrections(store) == [(0, 2), (2, 0)]
    assert store.corrections_for_analysis([2])[0].tolist() == [2]
    # bytes on disk: offsets int64 [N + 1], values uint16 [count]
    gdir = d / "gen-0001"
    assert (gdir / "offsets.bin").stat().st_size == 5 * 8 and (gdir / "values.bin").stat().st_size == 2 * 2
    meta = json.loads((gdir / "meta.json").read_text())
    assert meta["num_corrections"] == 2 and meta["added"] == 2 and meta["base_generation"] == -1
    # the merged correction is no longer unknown: correcting it again is an error
    with pytest.raises(ValueError, match=r"\(sample 0, class 2\) is already corrected in generation 1"):
        store.append_corrections(2, [0], [2])


def two_ranks(unk_file, d):
    return [LabelStore(unk_file, K, "given", corrections_dir=d, rank=r) for r in (0, 1)]


def test_merge_two_ranks_each_correction_once(unk_file, tmp_path):
    d = tmp_path / "corr"
    r0, r1 = two_ranks(unk_file, d)
    r0.append_corrections(1, [0, 1, 0], [2, 1, 2])  # duplicate within a rank
    r1.append_corrections(1, np.array([1, 3]), torch.tensor([1, 0]))  # (1, 1) also made by rank 0
    for s in (r0, r1):
        s.flush_corrections(1)
    assert log_path(d, 1, 1).stat().st_size == 16 + 2 * 6
    g = r0.merge_corrections(1, world_size=2)
    for s in (r0, r1):
        s.use_generation(g)
        assert corrections(s) == [(0, 2), (1, 1), (3, 0)]
    # epoch 2: rank 1 makes one correction via a loss mask, rank 0 makes none but still flushes
    mask = torch.zeros(2, K, dtype=torch.bool)
    mask[1, 3] = True  # sample 2, class 3
    r1.append_correction_mask(2, torch.tensor([3, 2]), mask)
    r0.flush_corrections(2)
    r1.flush_corrections(2)
    assert log_path(d, 2, 0).stat().st_size == 16
    g = r1.merge_corrections(2, world_size=2)
    r0.use_generation(g)
    assert corrections(r0) == [(0, 2), (1, 1), (2, 3), (3, 0)]
    assert json.loads((d / "gen-0002" / "meta.json").read_text())["added"] == 1
    # gen-0001 is untouched: generations are cumulative snapshots
    r1.use_generation(1)
    assert corrections(r1) == [(0, 2), (1, 1), (3, 0)]


def test_invalid_corrections(unk_file, neg_file, tmp_path):
    store = LabelStore(unk_file, K, "given", corrections_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"\(sample 0, class 0\) is an observed positive"):
        store.append_corrections(1, [0], [0])
    with pytest.raises(ValueError, match=r"\(sample 1, class 4\) is an observed negative"):
        store.append_corrections(1, [2, 1], [0, 4])
    with pytest.raises(IndexError, match="class id out of range"):
        store.append_corrections(1, [2], [5])
    with pytest.raises(ValueError, match="does not match"):
        store.append_corrections(1, [2, 3], [0])
    full = LabelStore(neg_file, K, "full", corrections_dir=tmp_path / "f")
    with pytest.raises(ValueError, match="leaves no entry unknown"):
        full.append_corrections(1, [1], [1])
    sub = LabelStore(unk_file, K, "given", subset_ids=[0, 2], corrections_dir=tmp_path / "s")
    with pytest.raises(ValueError, match="sample 1, which is not in this store's subset_ids"):
        sub.append_corrections(1, [1], [1])
    with pytest.raises(ValueError, match="no corrections_dir"):
        LabelStore(unk_file, K, "given").append_corrections(1, [2], [0])


def test_merge_errors(unk_file, tmp_path):
    d = tmp_path / "corr"
    r0, r1 = two_ranks(unk_file, d)
    r0.append_corrections(1, [2], [0])
    r0.flush_corrections(1)
    with pytest.raises(FileNotFoundError,
                       match=r"log-e0001-r1.bin: missing; every rank must call flush_corrections\(1\)"):
        r0.merge_corrections(1, world_size=2)
    r1.flush_corrections(1)
    with open(log_path(d, 1, 1), "ab") as f:
        f.write(b"\x01\x02\x03")  # a torn record
    with pytest.raises(ValueError, match="log-e0001-r1.bin: 19 bytes is not a header plus whole 6-byte records"):
        r0.merge_corrections(1, world_size=2)
    # a log that corrects an observed entry (written behind the store's back) is refused by the merge
    r1.append_corrections(1, [2], [1])
    r1._corrections._log.pending[0]["cls"] = 2  # (2, 2) is an observed positive
    r1.flush_corrections(1)
    with pytest.raises(ValueError, match=r"correct \(sample 2, class 2\), which is observed"):
        r0.merge_corrections(1, world_size=2)
    assert list_generations(d) == [] and current_generation(d) == -1


def test_crash_during_merge_keeps_previous_generation(unk_file, tmp_path, monkeypatch):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    store.append_corrections(1, [0], [2])
    store.flush_corrections(1)
    store.use_generation(store.merge_corrections(1, 1))
    store.append_corrections(2, [3, 1], [3, 2])
    store.flush_corrections(2)
    state = store.targets([0, 1, 2, 3])

    def crash(tmp, final):
        raise RuntimeError("simulated crash after the temporary generation is written")

    monkeypatch.setattr(corrections_module, "_publish", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.merge_corrections(2, 1)
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".tmp-gen-0002")]
    assert len(leftovers) == 1 and (d / leftovers[0] / "values.bin").is_file()
    assert list_generations(d) == [1] and current_generation(d) == 1 and store.generation == 1
    assert all(torch.equal(x, y) for x, y in zip(store.targets([0, 1, 2, 3]), state))
    fresh = LabelStore(unk_file, K, "given", corrections_dir=d)
    fresh.use_generation(current_generation(d))
    assert corrections(fresh) == [(0, 2)]
    # redo: the logs are still there, the leftover is cleaned up
    monkeypatch.undo()
    g = store.merge_corrections(2, 1)
    assert g == 2 and current_generation(d) == 2 and not any(p.name.startswith(".tmp-gen") for p in d.iterdir())
    store.use_generation(g)
    assert corrections(store) == [(0, 2), (1, 2), (3, 3)]
    # redoing a finished merge is idempotent
    before = (d / "gen-0002" / "values.bin").read_bytes()
    store.use_generation(1)
    assert store.merge_corrections(2, 1) == 2
    assert (d / "gen-0002" / "values.bin").read_bytes() == before


def test_resume_restores_state(unk_file, tmp_path):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    store.append_corrections(1, [1, 2], [3, 4])
    store.flush_corrections(1)
    store.use_generation(store.merge_corrections(1, 1))
    checkpoint = {"label_generation": store.generation}
    state = store.targets([0, 1, 2, 3])
    store.append_corrections(2, [2], [1])  # epoch 2 is interrupted before its merge
    store.flush_corrections(2)
    store.close()

    resumed = LabelStore(unk_file, K, "given", corrections_dir=d)
    resumed.use_generation(checkpoint["label_generation"])
    assert resumed.generation == 1
    assert resumed.discard_logs_after(1) == ["log-e0002-r0.bin"]
    assert log_path(d, 1, 0).is_file()
    assert all(torch.equal(x, y) for x, y in zip(resumed.targets([0, 1, 2, 3]), state))
    # re-running epoch 2 starts its log afresh: the interrupted attempt's (2, 1) is dropped
    resumed.append_corrections(2, [0], [4])
    resumed.flush_corrections(2)
    resumed.use_generation(resumed.merge_corrections(2, 1))
    assert corrections(resumed) == [(0, 4), (1, 3), (2, 4)]
    with pytest.raises(ValueError, match="epoch 2 but generation 2"):
        resumed.append_corrections(2, [3], [3])
    other = LabelStore(unk_file, K, "partial:0.5", corrections_dir=d)
    with pytest.raises(ValueError, match="protocol is 'given' but this store has 'partial:0.5'"):
        other.use_generation(2)
    with pytest.raises(FileNotFoundError, match=r"gen-0007: no such corrections generation \(have \[1, 2\]\)"):
        resumed.use_generation(7)
    resumed.use_generation(-1)
    assert resumed.num_corrections == 0 and resumed.targets([1])[0].sum() == 0


def _corrupt_generation(gdir, name: str, edit, fix_checksum: bool = False) -> None:
    """Rewrite ``gdir/name`` through ``edit(array)``; with ``fix_checksum`` also update meta.json's sha256,
    as a careful hand edit would, so that only the bounds checks can catch it."""
    dtype = "<i8" if name == "offsets.bin" else "<u2"
    a = np.fromfile(gdir / name, dtype=dtype)
    edit(a)
    a.tofile(gdir / name)
    if fix_checksum:
        meta = json.loads((gdir / "meta.json").read_text())
        meta["sha256"][name] = corrections_module.file_sha256(gdir / name)
        (gdir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name, edit, fix_checksum, message", [
    # a class id >= K would land on the next sample (row * K + 7 = (row + 1) * K + 2)
    ("values.bin", lambda a: a.__setitem__(0, 7), False, r"values\.bin: sha256 [0-9a-f]{64} differs from meta\.json"),
    ("values.bin", lambda a: a.__setitem__(0, 7), True, r"values\.bin: holds class 7, but the labels have 5 classes"),
    # offsets [0 2 2 3 3] -> [0 0 2 3 3]: still monotone, moves (0, 2) and (0, 4) to sample 1
    ("offsets.bin", lambda a: a.__setitem__(1, 0), False, r"offsets\.bin: sha256 [0-9a-f]{64} differs from meta"),
    ("offsets.bin", lambda a: a.__setitem__(2, 0), True, r"offsets\.bin: not valid CSR offsets"),
    ("values.bin", lambda a: a.__setitem__(slice(0, 2), [4, 2]), True,
     r"values\.bin: the classes of sample 0 are not sorted and unique"),
])
def test_damaged_generation_is_refused_naming_the_file(unk_file, tmp_path, name, edit, fix_checksum, message):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    store.append_corrections(1, [0, 0, 2], [2, 4, 0])
    store.flush_corrections(1)
    g = store.merge_corrections(1, world_size=1)
    gdir = d / "gen-0001"
    meta = json.loads((gdir / "meta.json").read_text())
    assert meta["version"] == 2 and sorted(meta["sha256"]) == ["offsets.bin", "values.bin"]
    assert np.fromfile(gdir / "offsets.bin", "<i8").tolist() == [0, 2, 2, 3, 3]
    _corrupt_generation(gdir, name, edit, fix_checksum)
    fresh = LabelStore(unk_file, K, "given", corrections_dir=d)
    with pytest.raises(ValueError, match=rf"^{gdir}/{message}.*remove the generation and redo the merge"):
        fresh.use_generation(g)
    assert fresh.generation == -1


def test_generation_without_checksums_is_used_with_a_warning(unk_file, tmp_path, caplog):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    store.append_corrections(1, [0, 2], [2, 0])
    store.flush_corrections(1)
    g = store.merge_corrections(1, world_size=1)
    meta_path = d / "gen-0001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta["version"] = 1  # written before the checksums existed
    meta_path.write_text(json.dumps(meta))
    fresh = LabelStore(unk_file, K, "given", corrections_dir=d)
    fresh.use_generation(g)
    assert corrections(fresh) == [(0, 2), (2, 0)]
    assert f"{meta_path}: version 1 generation has no checksums" in caplog.text


def test_remove_generations(unk_file, tmp_path):
    d = tmp_path / "corr"
    store = LabelStore(unk_file, K, "given", corrections_dir=d)
    for epoch, (s, c) in enumerate([(0, 2), (1, 1), (2, 3)], start=1):
        store.append_corrections(epoch, [s], [c])
        store.flush_corrections(epoch)
        store.use_generation(store.merge_corrections(epoch, 1))
    with pytest.raises(ValueError, match="would remove generation 3, in use"):
        store.remove_generations([1])
    store.append_corrections(4, [3], [0])  # epoch 4 in progress: its log is kept
    store.flush_corrections(4)
    removed = store.remove_generations([1, 3])
    assert removed == ["gen-0002", "log-e0001-r0.bin", "log-e0002-r0.bin", "log-e0003-r0.bin"]
    assert list_generations(d) == [1, 3] and log_path(d, 4, 0).is_file()
    assert corrections(store) == [(0, 2), (1, 1), (2, 3)]


def test_merge_matches_set_union(unk_file, tmp_path, monkeypatch):
    """Many corrections over chunk boundaries (3 samples per merge chunk) against a Python set."""
    monkeypatch.setattr(corrections_module, "_MERGE_ROWS", 3)
    monkeypatch.setattr(corrections_module, "_FLUSH_RECORDS", 4)
    gen = np.random.default_rng(1)
    n, k = 40, 30
    dense = gen.choice(np.array([1, -1, 0], dtype=np.int8), size=(n, k), p=[0.1, 0.2, 0.7])
    path = write_labels(tmp_path / "l.arrow", [np.flatnonzero(r == 1).tolist() for r in dense],
                        [np.flatnonzero(r == -1).tolist() for r in dense], "unknown")
    d = tmp_path / "corr"
    ranks = [LabelStore(path, k, "given", corrections_dir=d, rank=r) for r in range(3)]
    expected = set()
    for epoch in (1, 2):
        for store in ranks:
            ids = gen.choice(n, size=15)
            _, unknown = store.targets(ids)
            pick = unknown.numpy() & (gen.random((15, k)) < 0.2)
            store.append_correction_mask(epoch, ids, pick)
            rows, cols = np.nonzero(pick)
            expected |= set(zip(ids[rows].tolist(), cols.tolist()))
            store.flush_corrections(epoch)
        g = ranks[0].merge_corrections(epoch, world_size=3)
        for store in ranks:
            store.use_generation(g)
        assert corrections(ranks[0]) == sorted(expected)
    target, unknown = ranks[2].targets(np.arange(n))
    corrected = np.zeros((n, k), dtype=bool)
    for s, c in expected:
        corrected[s, c] = True
    assert (target.numpy() == ((dense == 1) | corrected)).all()
    assert (unknown.numpy() == ((dense == 0) & ~corrected)).all()
