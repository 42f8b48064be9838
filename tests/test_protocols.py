"""labels.arrow reading (shards.labels) and the label protocols (shards.protocols)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from largeloss.shards.format import FormatError, sample_key
from largeloss.shards.labels import (
    LABEL_SCHEMA,
    SparseLabels,
    canonical_rows,
    gather_rows,
    label_schema,
    read_labels,
    rows_sorted_unique,
)
from largeloss.shards.protocols import Protocol, observe, parse_protocol, partial, single_positive, train_val_split


def write_labels(path, pos, neg, unlisted, batch_rows=None, schema=None):
    """labels.arrow as ingest writes it: LABEL_SCHEMA, one row per sample id, uncompressed IPC file."""
    n = len(pos)
    schema = schema or label_schema(unlisted)
    batch_rows = batch_rows or max(n, 1)
    with ipc.new_file(str(path), schema) as w:
        for a in range(0, max(n, 1), batch_rows):
            b = min(n, a + batch_rows)
            w.write_batch(
                pa.record_batch(
                    [
                        pa.array(np.arange(a, b, dtype=np.uint32), pa.uint32()),
                        pa.array([sample_key(i) for i in range(a, b)], pa.string()),
                        pa.array([list(p) for p in pos[a:b]], pa.list_(pa.uint16())),
                        pa.array([list(q) for q in neg[a:b]], pa.list_(pa.uint16())),
                    ],
                    schema=schema,
                )
            )
    return path


def dense_from_lists(pos, neg, k, unlisted):
    m = np.full((len(pos), k), -1 if unlisted == "negative" else 0, dtype=np.int8)
    for i, (p, q) in enumerate(zip(pos, neg)):
        m[i, list(q)] = -1
        m[i, list(p)] = 1
    return m


# ----------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    "text, expected",
    [
        ("full", Protocol("full")),
        ("single_positive", Protocol("single_positive")),
        ("given", Protocol("given")),
        ("partial:0.1", Protocol("partial", 0.1)),
        (" partial:1 ", Protocol("partial", 1.0)),
    ],
)
def test_parse_protocol(text, expected):
    assert parse_protocol(text) == expected
    assert str(parse_protocol("partial:0.25")) == "partial:0.25"


@pytest.mark.parametrize(
    "text, message",
    [
        ("partial", "after a colon"),
        ("partial:", "after a colon"),
        ("partial:abc", "not a number"),
        ("partial:0", "in \\(0, 1\\]"),
        ("partial:1.5", "in \\(0, 1\\]"),
        ("partial:nan", "in \\(0, 1\\]"),
        ("partialx:0.1", "after a colon"),
        ("single-positive", "unknown protocol"),
        ("", "unknown protocol"),
    ],
)
def test_parse_protocol_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_protocol(text)


# ------------------------------------------------------------------------ read_labels

POS = [[0, 2], [], [1], [0, 1, 3]]
NEG = [[1], [0, 3], [], [2]]


def test_read_labels_single_batch_is_zero_copy(tmp_path):
    path = write_labels(tmp_path / "labels.arrow", POS, NEG, "unknown")
    lab = read_labels(path, 4)
    assert lab.num_samples == 4 and lab.num_classes == 4 and lab.unlisted == "unknown"
    assert lab.pos_offsets.tolist() == [0, 2, 2, 3, 6] and lab.pos_values.tolist() == [0, 2, 1, 0, 1, 3]
    assert lab.neg_offsets.tolist() == [0, 1, 3, 3, 4] and lab.neg_values.tolist() == [1, 0, 3, 2]
    assert lab.pos_values.dtype == np.uint16
    # views of the mapped file: numpy does not own them and cannot write them
    for a in (lab.pos_offsets, lab.pos_values, lab.neg_offsets, lab.neg_values):
        assert not a.flags.owndata and not a.flags.writeable
    assert lab.source == str(path)


def test_read_labels_several_batches_combined(tmp_path):
    one = read_labels(write_labels(tmp_path / "a.arrow", POS, NEG, "unknown"), 4)
    three = read_labels(write_labels(tmp_path / "b.arrow", POS, NEG, "unknown", batch_rows=1), 4)
    for name in ("pos_offsets", "pos_values", "neg_offsets", "neg_values"):
        assert getattr(three, name).tolist() == getattr(one, name).tolist(), name
    assert three.pos_offsets.dtype == np.int64


def test_read_labels_empty_file(tmp_path):
    lab = read_labels(write_labels(tmp_path / "labels.arrow", [], [], "negative"), 3)
    assert lab.num_samples == 0 and lab.dense([]).shape == (0, 3)


def test_dense_and_counts(tmp_path):
    lab = read_labels(write_labels(tmp_path / "labels.arrow", POS, NEG, "unknown"), 4)
    assert lab.dense([3, 0, 1]).tolist() == [[1, 1, -1, 1], [1, -1, 1, 0], [-1, 0, 0, -1]]
    # known per class: class 0 rows 0,1,3; class 1 rows 0,2,3; class 2 rows 0,3; class 3 rows 1,3
    assert lab.known_per_class().tolist() == [3, 3, 2, 2]
    assert lab.known_per_class([1, 2]).tolist() == [1, 1, 0, 1]
    assert lab.positives_per_class().tolist() == [2, 2, 1, 1]
    neg = read_labels(write_labels(tmp_path / "n.arrow", POS, NEG, "negative"), 4)
    assert neg.dense([1, 2]).tolist() == [[-1, -1, -1, -1], [-1, 1, -1, -1]]
    assert neg.known_per_class([1, 2]).tolist() == [2, 2, 2, 2]


def test_read_labels_errors_name_the_file(tmp_path):
    with pytest.raises(FormatError, match="missing.arrow: not found"):
        read_labels(tmp_path / "missing.arrow", 4)
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(FormatError, match="junk.arrow: not an Arrow IPC file"):
        read_labels(junk, 4)
    big = write_labels(tmp_path / "big.arrow", [[0], [7]], [[], []], "negative")
    with pytest.raises(FormatError, match="big.arrow: column 'pos' holds class 7 but the manifest has 4 classes"):
        read_labels(big, 4)
    no_meta = write_labels(tmp_path / "nometa.arrow", [[0]], [[]], "negative", schema=LABEL_SCHEMA)
    with pytest.raises(FormatError, match="nometa.arrow: schema metadata 'unlisted'"):
        read_labels(no_meta, 4)
    # rows out of sample-id order
    path = tmp_path / "order.arrow"
    schema = label_schema("negative")
    with ipc.new_file(str(path), schema) as w:
        w.write_batch(
            pa.record_batch(
                [pa.array([0, 2, 1], pa.uint32()), pa.array(["a", "b", "c"]),
                 pa.array([[0], [1], [2]], pa.list_(pa.uint16())), pa.array([[], [], []], pa.list_(pa.uint16()))],
                schema=schema,
            )
        )
    with pytest.raises(FormatError, match="order.arrow: row 1 has sample 2"):
        read_labels(path, 4)
    wrong = pa.schema([pa.field("sample", pa.uint32()), pa.field("key", pa.string()),
                       pa.field("pos", pa.list_(pa.int32())),
                       pa.field("neg", pa.list_(pa.uint16()))]).with_metadata({b"unlisted": b"negative"})
    path = tmp_path / "wrong.arrow"
    with ipc.new_file(str(path), wrong) as w:
        w.write_batch(pa.record_batch([pa.array([0], pa.uint32()), pa.array(["a"]),
                                       pa.array([[0]], pa.list_(pa.int32())),
                                       pa.array([[]], pa.list_(pa.uint16()))], schema=wrong))
    with pytest.raises(FormatError, match="wrong.arrow: column 'pos' must be list<item: uint16>"):
        read_labels(path, 4)


def test_gather_rows_and_canonical():
    offsets = np.array([0, 2, 2, 5])
    values = np.array([4, 1, 3, 3, 0], dtype=np.uint16)
    rows, cols = gather_rows(offsets, values, np.array([2, 0, 1, 2]))
    assert rows.tolist() == [0, 0, 0, 1, 1, 3, 3, 3] and cols.tolist() == [3, 3, 0, 4, 1, 3, 3, 0]
    assert not rows_sorted_unique(offsets, values)
    assert rows_sorted_unique(np.array([0, 2, 2, 3]), np.array([1, 4, 0]))  # decrease across a row boundary
    off, val = canonical_rows(offsets, values, 5)
    assert off.tolist() == [0, 2, 2, 4] and val.tolist() == [1, 4, 0, 3]


# --------------------------------------------------------------------------- protocols


def test_full_and_given(tmp_path):
    neg = read_labels(write_labels(tmp_path / "n.arrow", POS, NEG, "negative"), 4)
    assert observe(neg, "full") is neg and observe(neg, "given") is neg
    unk = read_labels(write_labels(tmp_path / "u.arrow", POS, NEG, "unknown"), 4)
    assert observe(unk, "given") is unk
    with pytest.raises(ValueError, match="u.arrow: protocol 'full' needs complete labels.*use protocol 'given'"):
        observe(unk, "full")


def cole_reference(dense01: np.ndarray, seed: int = 1200) -> np.ndarray:
    """Cole et al.'s generator on the dense 0/1 truth, written out as their code does it."""
    rng = np.random.RandomState(seed)
    obs = np.zeros(dense01.shape, dtype=np.int8)
    for i in range(dense01.shape[0]):
        row = dense01[i]
        idx = np.nonzero(row == 1)[0]
        rng.shuffle(idx)
        obs[i, idx[:1]] = 1
        idx = np.nonzero(row == 0)[0]
        rng.shuffle(idx)
        obs[i, idx[:0]] = -1  # keeps no negative
    return obs


def test_single_positive_literal():
    m = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 0],
                  [0, 0, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 1]])
    obs = single_positive(SparseLabels.from_dense(np.where(m == 1, 1, -1), "negative"))
    # chosen positive per row with RandomState(1200); without mirroring the negatives' shuffle, rows 2, 3
    # and 6 would pick 4, 1 and 2 instead
    assert obs.pos_offsets.tolist() == [0, 1, 1, 2, 3, 4, 5, 6, 7]
    assert obs.pos_values.tolist() == [0, 0, 4, 3, 0, 4, 0]
    assert obs.unlisted == "unknown" and len(obs.neg_values) == 0
    assert (obs.dense(range(8)) == cole_reference(m)).all()


@pytest.mark.parametrize("k, density, seed", [(5, 0.5, 1200), (20, 0.15, 1200), (80, 0.04, 7), (300, 0.9, 1200)])
def test_single_positive_equals_dense_reference(k, density, seed):
    gen = np.random.default_rng(k)
    m = (gen.random((400, k)) < density).astype(np.int8)
    m[:5] = 0  # rows without positives
    m[5:10] = 1  # rows with every class positive
    truth = SparseLabels.from_dense(np.where(m == 1, 1, -1), "negative")
    assert (single_positive(truth, seed).dense(range(400)) == cole_reference(m, seed)).all()


def test_single_positive_unsorted_rows_and_unknown_refused():
    # the same truth with rows listed out of order and with a duplicate gives the same draws
    m = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 0]])
    offsets = np.array([0, 4, 7, 9])
    values = np.array([3, 0, 2, 3, 1, 3, 0, 2, 1], dtype=np.uint16)
    truth = SparseLabels(offsets, values, np.zeros(4, np.int64), np.zeros(0, np.uint16), 4, "negative")
    assert (single_positive(truth).dense(range(3)) == cole_reference(m)).all()
    unk = SparseLabels.from_dense(np.array([[1, 0]]), "unknown", source="oi.arrow")
    with pytest.raises(ValueError, match="oi.arrow: single_positive .* unlisted=unknown"):
        single_positive(unk)


def partial_reference(dense: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """One uniform per known entry in row-major order; keep the truth label where it is < fraction."""
    rng = np.random.RandomState(seed)
    rows, cols = np.nonzero(dense != 0)
    keep = rng.random_sample(len(rows)) < fraction
    out = np.zeros_like(dense)
    out[rows[keep], cols[keep]] = dense[rows[keep], cols[keep]]
    return out


@pytest.mark.parametrize("unlisted", ["negative", "unknown"])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_partial_equals_reference(unlisted, chunk):
    gen = np.random.default_rng(3)
    dense = gen.choice(np.array([1, -1, 0], dtype=np.int8), size=(60, 9), p=[0.2, 0.5, 0.3])
    if unlisted == "negative":
        dense[dense == 0] = -1
    truth = SparseLabels.from_dense(dense, unlisted)
    obs = partial(truth, 0.3, seed=11, chunk_entries=chunk)
    assert obs.unlisted == "unknown"
    assert (obs.dense(range(60)) == partial_reference(dense, 0.3, 11)).all()
    assert (observe(truth, "partial:1").dense(range(60)) == dense).all()
    assert (partial(truth, 0.3, seed=12).dense(range(60)) != obs.dense(range(60))).any()


def test_partial_literal():
    # RandomState(5).random_sample(4) = [0.222, 0.871, 0.207, 0.919]: entries 1 and 3 (draws < 0.5) stay
    dense = np.array([[1, -1], [-1, 1]], dtype=np.int8)
    assert np.round(np.random.RandomState(5).random_sample(4), 3).tolist() == [0.222, 0.871, 0.207, 0.919]
    obs = partial(SparseLabels.from_dense(dense, "negative"), 0.5, seed=5)
    assert obs.dense([0, 1]).tolist() == [[1, 0], [-1, 0]]


# ---------------------------------------------------------------------- train/val cut


def test_train_val_split_literal_n10():
    # RandomState(1200).permutation(10) = [9 4 6 1 8 5 2 0 7 3]; n_val = round(0.2 * 10) = 2
    # train = sorted first 8 = [0 1 2 4 5 6 8 9], val = sorted last 2 = [3 7]
    assert np.random.RandomState(1200).permutation(10).tolist() == [9, 4, 6, 1, 8, 5, 2, 0, 7, 3]
    train, val = train_val_split(10)
    assert train.tolist() == [0, 1, 2, 4, 5, 6, 8, 9] and val.tolist() == [3, 7]


@pytest.mark.parametrize("n, frac", [(1001, 0.2), (57, 0.25), (5717, 0.2), (3, 0.2)])
def test_train_val_split_matches_cole(n, frac):
    rng = np.random.RandomState(1200)
    n_val = int(np.round(frac * n))
    perm = rng.permutation(n)
    train, val = train_val_split(n, frac)
    assert train.tolist() == sorted(perm[: n - n_val].tolist())
    assert val.tolist() == sorted(perm[-n_val:].tolist()) if n_val else val.tolist() == []
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == n


def test_train_val_split_edges():
    train, val = train_val_split(5, 0.0)
    assert train.tolist() == [0, 1, 2, 3, 4] and val.tolist() == []
    assert len(train_val_split(5717)[1]) == 1143  # VOC 2012: 5,717 -> 4,574 / 1,143
    with pytest.raises(ValueError, match="val_frac"):
        train_val_split(10, 1.0)
    with pytest.raises(ValueError, match="num_samples"):
        train_val_split(-1)
