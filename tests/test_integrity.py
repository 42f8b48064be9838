"""What is checked, and when (README): hostile or damaged files of a dataset directory at ingest, verify and open.

Each test reproduces one defect of issue 11 (an oversized JPEG, a tampered ``labels.arrow`` that kept its size,
a damaged manifest or Arrow footer, a temp file left by a full disk) and checks that it ends in a one-line
error or verify report naming the file, never in a silent change of a label or a pixel.
"""
from __future__ import annotations

import errno
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import simplejpeg

import largeloss.shards.format as shards_format
import largeloss.shards.jpeg as shards_jpeg
from conftest import declare_size
from largeloss.ingest import cli
from largeloss.shards.format import FORMAT_VERSION, FormatError, IngestPlan, Record, read_manifest, write_json_atomic
from largeloss.shards.jpeg import CorruptImage, validate_jpeg
from largeloss.shards.labels import read_labels
from largeloss.shards.labelstore import LabelStore
from largeloss.shards.reader import open_dataset, verify
from largeloss.shards.writer import write_dataset

K = 3


def _jpeg(seed: int, w: int = 16, h: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90)


def _plan(n: int = 20, extra: list[Record] | None = None) -> IngestPlan:
    # sample i is positive for class i % 3 only
    recs = [Record(str(i), f"{i}.jpg", pos=[i % K], data=_jpeg(i)) for i in range(n)]
    return IngestPlan("toy", [{"index": i, "id": str(i), "name": f"c{i}"} for i in range(K)],
                      {"train": recs + (extra or []), "test": recs[:4]}, "negative")


@pytest.fixture
def ds(tmp_path) -> Path:
    out = tmp_path / "ds"
    write_dataset(out, _plan(), shard_size=8, progress=False)
    return out


# ---------------------------------------------------------------------------------- 1. oversized JPEG

def test_oversized_jpeg_is_refused_at_ingest_by_its_header(tmp_path):
    hostile = declare_size(_jpeg(0), 60000, 60000)
    assert len(hostile) < 1000
    with pytest.raises(CorruptImage, match=r"declares 60000x60000 = 3,600,000,000 pixels, more than the limit of "
                                           r"268,435,456 \(--max-pixels\)"):
        validate_jpeg(hostile)
    assert validate_jpeg(hostile, max_pixels=60000 * 60000) == (60000, 60000)
    # at ingest it is one more corrupt image, counted and named (fatal under --strict)
    m = write_dataset(tmp_path / "out", _plan(4, [Record("big", "big.jpg", [0], data=hostile)]), progress=False)
    assert m.counts["train"]["corrupt"] == 1 and m.counts["train"]["written"] == 4
    assert m.counts["train"]["problems"][0][:3] == [4, "corrupt", "big.jpg"]
    assert "60000x60000" in m.counts["train"]["problems"][0][3]
    assert m.source["ingest"]["max_pixels"] == shards_jpeg.DEFAULT_MAX_PIXELS == 2**28


def test_max_pixels_option_reaches_the_writer(tmp_path, capsys):
    from test_voc import _make_tree  # VOC layout, 16 x 8 px images a (cat), e (dog, person), f (cat)

    root = _make_tree(tmp_path)
    argv = ["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
            "--no-progress"]
    # 16 * 8 = 128 pixels: a limit of 100 makes every readable image corrupt
    assert cli.main(argv + ["--out", str(tmp_path / "out"), "--max-pixels", "100"]) == 0
    m = read_manifest(tmp_path / "out")
    assert m.source["ingest"]["max_pixels"] == 100
    assert (m.counts["train"]["written"], m.counts["train"]["corrupt"]) == (0, 4)
    with pytest.raises(SystemExit):
        cli.main(argv + ["--out", str(tmp_path / "o2"), "--max-pixels", str(2**31)])
    assert "at most 1073741824" in capsys.readouterr().err


def test_full_check_decodes_at_reduced_scale():
    """--check full entropy-decodes every block, but at 1/8 scale: 16000 x 16000 declared -> 2000 x 2000 grey."""
    hostile = declare_size(_jpeg(0), 16000, 16000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CorruptImage, match="does not decode cleanly"):
            validate_jpeg(hostile, full=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a full-size grey decode allocates 16000 * 16000 = 256 MB; 1/8 scale 2000 * 2000 = 4 MB
    assert peak < 16e6, peak
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------- 2. every file checksummed

def test_manifest_has_size_and_sha256_of_every_file(ds):
    m = read_manifest(ds)
    assert m.format_version == FORMAT_VERSION == 2
    listed = []
    for split, info in m.splits.items():
        for sh in info.shards:
            for name, size, sha in ((sh.file, sh.size, sh.sha256), (sh.file[:-4] + ".idx", sh.idx_size, sh.idx_sha256)):
                path = ds / split / name
                assert (path.stat().st_size, shards_format.file_sha256(path)) == (size, sha)
                listed.append(f"{split}/{name}")
        labels = ds / split / "labels.arrow"
        assert (labels.stat().st_size, shards_format.file_sha256(labels)) == (info.labels_size, info.labels_sha256)
        listed.append(f"{split}/labels.arrow")
    assert [f for f, _, _ in m.files()] == listed
    on_disk = sorted(p.relative_to(ds).as_posix() for p in ds.glob("*/*")
                     if not any(part.startswith(".") for part in p.relative_to(ds).parts))
    assert sorted(listed) == on_disk


def _pos_offsets_position(path: Path) -> tuple[int, np.ndarray]:
    """Byte offset of the ``pos`` list offsets (int32) in labels.arrow, and their values."""
    raw = path.read_bytes()
    offsets = ipc.open_file(pa.memory_map(str(path))).get_batch(0).column("pos").offsets.to_numpy()
    at = raw.find(offsets.astype("<i4").tobytes())
    assert at > 0
    return at, offsets


def test_a_moved_label_fails_verify_and_open_full(ds):
    labels = ds / "train" / "labels.arrow"
    at, offsets = _pos_offsets_position(labels)
    assert offsets[12:15].tolist() == [12, 13, 14]  # one positive per sample
    raw = bytearray(labels.read_bytes())
    raw[at + 4 * 13] -= 1  # offsets[13] = 12: sample 12 loses its positive to sample 13
    labels.write_bytes(bytes(raw))
    moved = read_labels(labels, K)
    assert moved.dense([12, 13]).tolist() == [[-1, -1, -1], [1, 1, -1]]  # the damage the checks must catch

    problems = verify(ds)
    assert problems == [f"{labels}: sha256 {shards_format.file_sha256(labels)} differs from manifest.json "
                        f"({read_manifest(ds).splits['train'].labels_sha256}); re-run ingest for split 'train'"]
    open_dataset(ds)  # same size: the cheap check at open passes ...
    with pytest.raises(FormatError, match=rf"^{labels}: sha256 [0-9a-f]{{64}} differs from manifest\.json"):
        open_dataset(ds, verify="full")  # ... hashing every file does not


def test_swapped_label_rows_fail_verify(ds):
    labels = ds / "train" / "labels.arrow"
    values = ipc.open_file(pa.memory_map(str(labels))).get_batch(0).column("pos").values.to_numpy()
    assert values[3:5].tolist() == [0, 1]  # one positive per sample: rows 3 and 4 are these two entries
    raw = bytearray(labels.read_bytes())
    at = raw.find(values.astype("<u2").tobytes())
    raw[at + 6: at + 10] = raw[at + 8: at + 10] + raw[at + 6: at + 8]  # the rows' positives trade places
    labels.write_bytes(bytes(raw))
    assert read_labels(labels, K).dense([3, 4]).tolist() == [[-1, 1, -1], [1, -1, -1]]
    assert [p.split(": ")[1].split(" ")[0] for p in verify(ds)] == ["sha256"]


@pytest.mark.parametrize("name", ["train/000001.tar", "train/000001.idx", "test/labels.arrow"])
def test_open_refuses_a_file_whose_size_differs(ds, name):
    path = ds / name
    with open(path, "ab") as f:
        f.write(b"\x00")
    size = read_manifest(ds)
    expected = {"train/000001.tar": size.splits["train"].shards[1].size,
                "train/000001.idx": size.splits["train"].shards[1].idx_size,
                "test/labels.arrow": size.splits["test"].labels_size}[name]
    what = f"{path}: {expected + 1} bytes, manifest.json says {expected}; "
    split = name.split("/")[0]
    with pytest.raises(FormatError) as info:
        open_dataset(ds)
    assert str(info.value) == (f"{what}the file was changed after the ingest: run `ingest verify` on the dataset and "
                               f"re-run ingest for split {split!r}")
    assert f"{what}re-run ingest for split {split!r}" in verify(ds)


def test_open_full_shows_progress(ds, capsys):
    open_dataset(ds, verify="full", progress=True)
    assert "verify" in capsys.readouterr().err
    with pytest.raises(ValueError, match="verify must be one of"):
        open_dataset(ds, verify="sha")


def test_manifest_of_format_1_asks_for_a_new_ingest(ds):
    path = ds / "manifest.json"
    d = json.loads(path.read_text())
    d["format_version"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(FormatError, match=rf"^{path}: format_version 1 but this code reads 2;.*re-run the ingest "
                                          r"command with --overwrite"):
        open_dataset(ds)


# ------------------------------------------------------------------------------ 9. damaged manifest / Arrow

def _edit_manifest(ds: Path, edit) -> Path:
    path = ds / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["splits"]["train"]["shards"][0].update(extra=1),
     r"splits\.train\.shards\[0\]: unknown key 'extra'"),
    (lambda d: d.update(splits=list(d["splits"].values())), r"splits must be an object, got a list"),
    (lambda d: d["splits"]["train"]["shards"][0].update(size="12"), r"splits\.train\.shards\[0\]\.size must be an "
                                                                    r"integer >= 0, got '12'"),
    (lambda d: d["splits"]["train"].pop("num_samples"), r"splits\.train: missing key 'num_samples'"),
    (lambda d: d.update(classes={"a": 1}), r"classes must be a list, got an object"),
    (lambda d: d["splits"]["train"]["shards"][1].update(file="../../x.tar"),
     r"splits\.train\.shards\[1\]\.file is '\.\./\.\./x\.tar', expected '000001\.tar'"),
])
def test_damaged_manifest_is_one_line_naming_it(ds, edit, message):
    path = _edit_manifest(ds, edit)
    with pytest.raises(FormatError, match=rf"^{path}: {message}; re-run ingest"):
        open_dataset(ds)
    (line,) = verify(ds)
    assert line.startswith(f"{path}: ") and "\n" not in line


def test_non_utf8_manifest_is_one_line(ds):
    path = ds / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"toy"', b'"t\xffy"'))
    with pytest.raises(FormatError, match=rf"^{path}: not UTF-8 text \(byte 0xff at offset \d+\); re-run ingest"):
        open_dataset(ds)
    assert len(verify(ds)) == 1


def test_damaged_arrow_footer_names_the_file(ds):
    labels = ds / "train" / "labels.arrow"
    raw = bytearray(labels.read_bytes())
    for i in range(len(raw) - 60, len(raw) - 10):  # the flatbuffer footer, before its length and b"ARROW1"
        raw[i] ^= 0xFF
    labels.write_bytes(bytes(raw))
    for call in (lambda: open_dataset(ds), lambda: read_labels(labels, K), lambda: LabelStore(labels, K)):
        with pytest.raises(FormatError, match=rf"^{labels}: not an Arrow IPC file \(.*Footer.*\); re-run ingest"):
            call()
    problems = verify(ds)
    assert any(p.startswith(f"{labels}: not an Arrow IPC file") for p in problems), problems


# ----------------------------------------------------------------------------------------- 10. leftovers

def test_write_json_atomic_removes_its_temp_file_when_the_disk_is_full(tmp_path, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, mode="r", **kw):
        return FullDisk(real_open(path, mode, **kw))

    target = tmp_path / "manifest.json"
    target.write_text("old")
    monkeypatch.setattr(shards_format, "open", full_open, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        write_json_atomic(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert target.read_text() == "old"


# ------------------------------------------------------------------------------------- the trainer's checks

def test_trainer_refuses_a_changed_dataset_before_the_run_directory(ds, tmp_path, capsys):
    from largeloss.train.main import main as train_main

    runs = tmp_path / "runs"
    argv = [f"data={ds}", f"out={runs}", "epochs=1", "progress=false"]
    idx = ds / "train" / "000000.idx"
    size = idx.stat().st_size
    with open(idx, "ab") as f:
        f.write(b"\n")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {idx}: {size + 1} bytes, manifest.json says {size}; the file was changed after the "
                   f"ingest: run `ingest verify` on the dataset and re-run ingest for split 'train'\n")
    assert not runs.exists()
    # same size, other bytes: only verify=full (hash every file before training) finds it
    with open(idx, "r+b") as f:
        f.truncate(size)
        f.seek(size - 2)
        f.write(b" ")
    assert train_main(argv + ["verify=full"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {idx}: sha256 ") and err.count("\n") == 1
    assert not runs.exists()


@pytest.mark.parametrize("kind", ["cpu", "dali"])
def test_trainer_passes_on_error_to_its_loaders(ds, kind):
    from types import SimpleNamespace

    from largeloss.train.config import build_config
    from largeloss.train.images import build_loader

    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = build_config([], [f"data={ds}", "on_error=skip", f"loader={kind}", "num_workers=0"])
    accelerator = SimpleNamespace(device=__import__("torch").device("cpu"), process_index=0, num_processes=1)
    loader = build_loader(cfg, accelerator, "train", None, train=True)
    assert type(loader).__name__ == ("DaliLoader" if kind == "dali" else "ShardLoader")
    assert loader.on_error == "skip"
