"""The shard writer (shards/writer.py) and reader (shards/reader.py): layout, exact bytes, skips, resume, verify;
JPEG validation (shards/jpeg.py) and the DALI index (shards/tar.py)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import simplejpeg

import largeloss.shards.jpeg as jpeg
import largeloss.shards.writer as writer
from conftest import FIXTURES
from largeloss.shards.format import FormatError, IngestError, IngestPlan, Record, read_manifest
from largeloss.shards.jpeg import CorruptImage, validate_jpeg
from largeloss.shards.reader import open_dataset, verify
from largeloss.shards.tar import (
    MEMBER_EXTS,
    TarBytes,
    dali_index_text,
    decode_sample_id,
    encode_sample_id,
    format_dali_index,
    iter_samples,
    sample_members,
    write_dali_index,
)
from largeloss.shards.writer import summary_table, write_dataset

FIXTURES_VOC07 = FIXTURES / "voc2007-format-reference" / "VOCdevkit" / "VOC2007"


def _jpeg(seed: int, w: int = 16, h: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90)


def _classes(k: int) -> list[dict]:
    return [{"index": i, "id": f"c{i}", "name": f"class{i}"} for i in range(k)]


def _files(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i}.jpg"
        p.write_bytes(_jpeg(i, 16 + i, 8))
        paths.append(p)
    return paths


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), without the lock file."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}


def _tar_members(path: Path) -> list[tuple[str, bytes, tarfile.TarInfo]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read(), m) for m in tf]


# -------------------------------------------------------------------------------------- JPEG validation

def test_validate_jpeg_fast_and_full():
    d = _jpeg(0, 48, 32)
    assert validate_jpeg(d) == (48, 32)
    assert validate_jpeg(d + b"trailing bytes after EOI") == (48, 32)
    progressive = FIXTURES_VOC07 / "JPEGImages" / "000001.jpg"  # progressive, 353x500 per its XML
    assert validate_jpeg(progressive.read_bytes(), full=True) == (353, 500)

    with pytest.raises(CorruptImage, match="truncated: no end-of-image marker"):
        validate_jpeg(d[: len(d) // 2])
    with pytest.raises(CorruptImage, match="truncated: no end-of-image marker"):
        validate_jpeg(d[:-2])  # only the EOI marker cut off
    with pytest.raises(CorruptImage, match="looks like PNG"):
        validate_jpeg(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(CorruptImage, match="empty file"):
        validate_jpeg(b"")
    with pytest.raises(CorruptImage, match="unreadable JPEG header"):
        validate_jpeg(d[:40])

    # An EXIF thumbnail (a whole JPEG, with its own EOI) in APP1 must not hide the truncation of the
    # main image: the EOI search starts after the first scan header, found by walking segment lengths.
    thumb = _jpeg(1, 8, 8)
    app1 = b"Exif\x00\x00" + thumb
    with_thumb = b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + d[2:]
    assert validate_jpeg(with_thumb) == (48, 32)
    with pytest.raises(CorruptImage, match="truncated"):
        validate_jpeg(with_thumb[:-300])

    # a restart marker inside the entropy-coded data: the structure is intact, only a strict decode sees it
    scan = jpeg._first_scan_offset(d)
    damaged = d[: scan + 50] + b"\xff\xd0" + d[scan + 50:]
    assert validate_jpeg(damaged) == (48, 32)
    with pytest.raises(CorruptImage, match="does not decode cleanly"):
        validate_jpeg(damaged, full=True)


# -------------------------------------------------------------------------------------- layout + bytes

def test_layout_members_labels_and_manifest_exact(tmp_path):
    paths = _files(tmp_path / "src", 4)
    data_jpeg = _jpeg(99, 20, 10)
    recs = [
        Record("a", "img0.jpg", pos=[2, 0, 2], path=str(paths[0]),
               meta={"boxes": [{"class": 0, "bbox": [1.5, 2.0, 3.0, 4.0]}]}),
        Record("b", "img1.jpg", pos=[1], neg=[0], path=str(paths[1])),
        Record("c", "img2.jpg", pos=[], neg=[2, 1], path=str(paths[2]), meta={"width": 1, "note": "x"}),
        Record("d", "img3.jpg", pos=[0], path=str(paths[3])),
        Record("e", "mem.jpg", pos=[1, 2], data=data_jpeg),
    ]
    plan = IngestPlan("toy", _classes(3), {"train": recs}, "unknown", source={"root": "src"},
                      counts={"train": {"skipped": {"no_positive": 7}}})
    out = tmp_path / "out"
    m = write_dataset(out, plan, shard_size=2, progress=False)

    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "000000.idx", "000000.tar", "000001.idx", "000001.tar", "000002.idx", "000002.tar", "labels.arrow"]
    info = m.splits["train"]
    assert [(s.file, s.first_sample, s.num_samples) for s in info.shards] == [
        ("000000.tar", 0, 2), ("000001.tar", 2, 2), ("000002.tar", 4, 1)]
    # positives: a {0,2}, b {1}, d {0}, e {1,2} -> class0 2, class1 2, class2 2
    assert info.positives_per_class == [2, 2, 2]
    # unlisted=unknown: known = pos + neg; neg: b {0}, c {1,2} -> class0 2+1, class1 2+1, class2 2+1
    assert info.known_per_class == [3, 3, 3]
    assert m.counts["train"] == {"listed": 5, "written": 5, "missing": 0, "corrupt": 0,
                                 "skipped": {"no_positive": 7}, "problems": []}
    assert m.source == {"root": "src", "ingest": {"writer_version": 1, "shard_size": 2, "strict": False,
                                                  "check": "fast", "max_pixels": 2**28}}
    assert read_manifest(out) == m

    members = _tar_members(out / "train" / "000000.tar")
    assert [name for name, _, _ in members] == [
        "000000000.idx", "000000000.jpg", "000000000.json", "000000001.idx", "000000001.jpg", "000000001.json"]
    assert members[0][1] == b"\x00\x00\x00\x00" and members[3][1] == b"\x01\x00\x00\x00"
    assert members[1][1] == paths[0].read_bytes() and members[4][1] == paths[1].read_bytes()
    assert json.loads(members[2][1]) == {"source_id": "a", "rel_path": "img0.jpg", "width": 16, "height": 8,
                                         "boxes": [{"class": 0, "bbox": [1.5, 2.0, 3.0, 4.0]}]}
    for _, _, ti in members:
        assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == (0, 0, 0, "", "", 0o644)
    # the adapter's width/height are replaced by the header's (16+2 = 18 px wide image)
    c_json = json.loads(_tar_members(out / "train" / "000001.tar")[2][1])
    assert c_json == {"source_id": "c", "rel_path": "img2.jpg", "width": 18, "height": 8, "note": "x"}
    last = _tar_members(out / "train" / "000002.tar")
    assert last[1][1] == data_jpeg and json.loads(last[2][1])["width"] == 20
    # tar size: per member a 512-byte header + data padded to 512, then two zero blocks
    size0 = sum(512 + -(-len(data) // 512) * 512 for _, data, _ in members) + 1024
    assert (out / "train" / "000000.tar").stat().st_size == size0 == info.shards[0].size

    table = ipc.open_file(pa.memory_map(str(out / "train" / "labels.arrow"))).read_all()
    assert table.num_rows == 5 and ipc.open_file(str(out / "train" / "labels.arrow")).num_record_batches == 1
    assert table.to_pydict() == {
        "sample": [0, 1, 2, 3, 4],
        "key": ["000000000", "000000001", "000000002", "000000003", "000000004"],
        "pos": [[0, 2], [1], [], [0], [1, 2]],
        "neg": [[], [0], [1, 2], [], []],
    }
    assert table.schema.metadata[b"unlisted"] == b"unknown"


def test_rerun_and_worker_count_give_identical_bytes(tmp_path):
    paths = _files(tmp_path / "src", 5)

    def plan():
        return IngestPlan("toy", _classes(2), {"train": [Record(str(i), p.name, [i % 2], path=str(p))
                                                         for i, p in enumerate(paths)]}, "negative")

    write_dataset(tmp_path / "a", plan(), shard_size=2, workers=1, progress=False)
    write_dataset(tmp_path / "b", plan(), shard_size=2, workers=3, progress=False)
    first = _tree(tmp_path / "a")
    assert first == _tree(tmp_path / "b")
    # a re-run into a complete folder verifies and rewrites the same bytes
    write_dataset(tmp_path / "a", plan(), shard_size=2, workers=2, progress=False)
    assert _tree(tmp_path / "a") == first
    # complete annotation: every sample counts as known for every class
    m = read_manifest(tmp_path / "a")
    assert m.splits["train"].known_per_class == [5, 5] and m.splits["train"].positives_per_class == [3, 2]


# ------------------------------------------------------------------------------------- missing/corrupt

def _mixed_plan(tmp_path: Path) -> tuple[IngestPlan, list[Path]]:
    paths = _files(tmp_path / "src", 5)
    paths[1].unlink()  # missing
    good = paths[2].read_bytes()
    paths[2].write_bytes(good[:-20])  # truncated inside the scan data, header intact
    paths[3].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # not a JPEG
    recs = [Record(f"s{i}", p.name, [0], path=str(p)) for i, p in enumerate(paths)]
    return IngestPlan("toy", _classes(1), {"train": recs}, "negative"), paths


def test_missing_and_corrupt_images_are_counted_and_skipped(tmp_path):
    plan, paths = _mixed_plan(tmp_path)
    m = write_dataset(tmp_path / "out", plan, shard_size=10, workers=2, progress=False)
    c = m.counts["train"]
    assert (c["listed"], c["written"], c["missing"], c["corrupt"]) == (5, 2, 1, 2)
    assert [p[:3] for p in c["problems"]] == [[1, "missing", "img1.jpg"], [2, "corrupt", "img2.jpg"],
                                              [3, "corrupt", "img3.jpg"]]
    assert "truncated" in c["problems"][1][3] and "PNG" in c["problems"][2][3]
    ds = open_dataset(tmp_path / "out")
    assert [(s.sample_id, s.meta["source_id"]) for s in ds.iter_samples("train")] == [(0, "s0"), (1, "s4")]
    table = summary_table(m)
    assert table.splitlines()[1].split() == ["train", "5", "2", "1", "2", "-", "1.00", "0.00", "2", "2", "2"]
    assert "  train: img1.jpg: missing (file not found)" in table


def test_strict_fails_naming_the_file(tmp_path):
    plan, paths = _mixed_plan(tmp_path)
    with pytest.raises(IngestError, match=rf"^{paths[1]}: missing image \(file not found"):
        write_dataset(tmp_path / "out", plan, strict=True, progress=False)
    assert not list((tmp_path / "out" / "train").glob("*.tar"))
    assert not list((tmp_path / "out" / "train").glob(".*"))  # the open shard's temp file was removed


def test_empty_split_writes_no_shard(tmp_path):
    recs = [Record("x", "x.jpg", [0], path=str(tmp_path / "nope.jpg"))]
    m = write_dataset(tmp_path / "out", IngestPlan("toy", _classes(1), {"test": recs}, "negative"), progress=False)
    assert m.splits["test"].num_samples == 0 and m.splits["test"].shards == []
    assert m.counts["test"]["missing"] == 1
    ds = open_dataset(tmp_path / "out")
    assert list(ds.iter_samples("test")) == [] and ds.labels_table("test").num_rows == 0
    assert verify(tmp_path / "out") == []


def test_bad_records_are_adapter_errors(tmp_path):
    (p,) = _files(tmp_path / "src", 1)
    for rec, msg in [
        (Record("a", "a.jpg", [3], path=str(p)), r"record 0 \(source_id 'a', a.jpg\): pos holds class 3, outside 0..1"),
        (Record("a", "a.jpg", [1], neg=[1], path=str(p)), r"classes \[1\] are both positive and negative"),
        (Record("a", "a.jpg", [0]), "exactly one of path and data"),
        (Record("a", "a.jpg", [0], path=str(p), meta={"x": float("nan")}), "meta is not plain JSON"),
    ]:
        with pytest.raises(IngestError, match=msg):
            write_dataset(tmp_path / "out", IngestPlan("toy", _classes(2), {"train": [rec]}, "negative"),
                          overwrite=True, progress=False)


# ---------------------------------------------------------------------------------------------- resume

def _resume_plan(paths: list[Path]) -> IngestPlan:
    # 9 records, shard size 2; record 3 is missing, so shards hold records {0,1} {2,3,4} {5,6} {7,8}
    recs = [Record(f"s{i}", p.name, [i % 3], path=str(p)) for i, p in enumerate(paths)]
    return IngestPlan("toy", _classes(3), {"train": recs, "test": recs[:3]}, "negative", source={"v": 1})


def _count_loads(monkeypatch) -> list[str]:
    loaded = []
    real = writer._load

    def counting(rec, *args):
        loaded.append(rec.source_id)
        return real(rec, *args)

    monkeypatch.setattr(writer, "_load", counting)
    return loaded


def crash_after_second_commit(monkeypatch):
    """Make the writer raise "simulated crash" right after it committed its second shard; returns the real
    ``_commit_shard`` (to restore it)."""
    calls = []
    real_commit = writer._commit_shard

    def crash_after_second(split_dir, state_dir, shard):
        info = real_commit(split_dir, state_dir, shard)
        calls.append(info.file)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return info

    monkeypatch.setattr(writer, "_commit_shard", crash_after_second)
    return real_commit


def test_resume_after_crash_is_byte_identical(tmp_path, monkeypatch):
    paths = _files(tmp_path / "src", 9)
    paths[3].unlink()
    write_dataset(tmp_path / "ref", _resume_plan(paths), shard_size=2, progress=False)

    real_commit = crash_after_second_commit(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(tmp_path / "out", _resume_plan(paths), shard_size=2, workers=2, progress=False)
    train = tmp_path / "out" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["000000.idx", "000000.tar", "000001.idx", "000001.tar"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    # what a kill -9 leaves behind: a temp shard and a stray later shard with no sidecar
    (train / ".000002.tar.tmp").write_bytes(b"partial")
    (train / "000003.tar").write_bytes(b"stale")
    (train / "000007.tar").write_bytes(b"stale")  # beyond the last shard: must be deleted, not overwritten

    monkeypatch.setattr(writer, "_commit_shard", real_commit)
    loaded = _count_loads(monkeypatch)
    write_dataset(tmp_path / "out", _resume_plan(paths), shard_size=2, progress=False)
    # shards 0 and 1 (records 0..4) were kept without reading their images
    assert loaded == ["s5", "s6", "s7", "s8", "s0", "s1", "s2"]
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")
    assert verify(tmp_path / "out") == []


def test_resume_rewrites_unconfirmed_or_damaged_shards(tmp_path, monkeypatch):
    paths = _files(tmp_path / "src", 9)
    paths[3].unlink()
    out = tmp_path / "out"
    write_dataset(out, _resume_plan(paths), shard_size=2, progress=False)
    reference = _tree(out)
    loaded = _count_loads(monkeypatch)

    # a crash between the rename and the sidecar: shard 2 exists but is not confirmed -> rewritten from 2 on
    (out / ".ingest" / "train" / "000002.json").unlink()
    write_dataset(out, _resume_plan(paths), shard_size=2, progress=False)
    assert loaded == ["s5", "s6", "s7", "s8"]  # test split: its only shard is intact and kept
    assert _tree(out) == reference

    # a damaged byte in shard 0 -> its sha256 fails -> everything from shard 0 is rewritten
    loaded.clear()
    tar0 = out / "train" / "000000.tar"
    raw = bytearray(tar0.read_bytes())
    raw[2000] ^= 0xFF
    tar0.write_bytes(bytes(raw))
    write_dataset(out, _resume_plan(paths), shard_size=2, progress=False)
    assert loaded == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]
    assert _tree(out) == reference


def test_other_plan_or_arguments_are_refused(tmp_path):
    paths = _files(tmp_path / "src", 9)
    paths[3].unlink()
    out = tmp_path / "out"
    write_dataset(out, _resume_plan(paths), shard_size=2, progress=False)
    with pytest.raises(IngestError, match=r"shard_size: was 2, now 3\)\. Re-run with the same plan"):
        write_dataset(out, _resume_plan(paths), shard_size=3, progress=False)
    other = _resume_plan(paths)
    other.source = {"v": 2}
    with pytest.raises(IngestError, match=r"source\.v: was 1, now 2"):
        write_dataset(out, other, shard_size=2, progress=False)

    write_dataset(out, _resume_plan(paths), shard_size=3, overwrite=True, progress=False)
    write_dataset(tmp_path / "fresh", _resume_plan(paths), shard_size=3, progress=False)
    assert _tree(out) == _tree(tmp_path / "fresh")


def _interrupted_ingest(tmp_path: Path, monkeypatch) -> tuple[list[Path], Path]:
    """The 9 source files of ``_resume_plan`` and an ingest of them into tmp_path/out that crashed right after
    its third shard commit (train shards 0-2 committed; what a kill -9 there leaves behind)."""
    paths = _files(tmp_path / "src", 9)
    paths[3].unlink()  # shards: records {0,1} {2,3,4} {5,6} {7,8}
    out = tmp_path / "out"
    calls = []
    real_commit = writer._commit_shard

    def crash(split_dir, state_dir, shard):
        calls.append(real_commit(split_dir, state_dir, shard))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return calls[-1]

    monkeypatch.setattr(writer, "_commit_shard", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(out, _resume_plan(paths), shard_size=2, progress=False)
    monkeypatch.setattr(writer, "_commit_shard", real_commit)
    return paths, out


@pytest.mark.parametrize("change", ["re-encoded", "same size, new mtime", "deleted", "label"])
def test_resume_rewrites_from_the_first_shard_whose_source_changed(tmp_path, monkeypatch, caplog, change):
    """Interrupt, change the source of shard 1, resume: shard 0 is kept, everything from shard 1 is rewritten,
    and the result is what an uninterrupted ingest of the changed source writes."""
    paths, out = _interrupted_ingest(tmp_path, monkeypatch)
    plan = _resume_plan(paths)
    if change == "re-encoded":
        paths[4].write_bytes(_jpeg(40, 30, 9))
    elif change == "same size, new mtime":
        raw = bytearray(paths[4].read_bytes())
        raw[-10] = 0x11 if raw[-10] != 0x11 else 0x12  # another byte in the scan data, same size
        paths[4].write_bytes(bytes(raw))
        os.utime(paths[4], ns=(paths[4].stat().st_atime_ns, paths[4].stat().st_mtime_ns + 10**9))
    elif change == "deleted":
        paths[2].unlink()
    else:
        plan.splits["train"][4].pos = [0, 2]  # was [1]
    loaded = _count_loads(monkeypatch)
    m = write_dataset(out, plan, shard_size=2, progress=False)
    assert "shard 000001 of split 'train': its source records or image files changed since the interrupted run; " \
           "rewriting from it" in caplog.text
    assert loaded[:2] == ["s2", "s3"]  # shard 0 (s0, s1) kept without reading its images
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    write_dataset(fresh, plan, shard_size=2, progress=False)
    assert _tree(out) == _tree(fresh) and verify(out) == []
    c = m.counts["train"]
    assert c["missing"] == (2 if change == "deleted" else 1)
    if change != "label":
        sample4 = [s for s in open_dataset(out).iter_samples("train") if s.meta["source_id"] == "s4"]
        assert [s.jpeg for s in sample4] == [paths[4].read_bytes()]


def test_resume_after_the_source_lost_records_rewrites_the_tail(tmp_path, monkeypatch):
    paths, out = _interrupted_ingest(tmp_path, monkeypatch)
    shorter = _resume_plan(paths)
    shorter.splits["train"] = shorter.splits["train"][:3]  # the source now ends inside shard 1
    write_dataset(out, shorter, shard_size=2, progress=False)
    write_dataset(tmp_path / "fresh", shorter, shard_size=2, progress=False)
    assert _tree(out) == _tree(tmp_path / "fresh")


def test_foreign_folder_is_not_touched(tmp_path):
    (p,) = _files(tmp_path / "src", 1)
    plan = IngestPlan("toy", _classes(1), {"train": [Record("a", "a.jpg", [0], path=str(p))]}, "negative")
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(IngestError, match=r"holds train but no \.ingest/state\.json"):
        write_dataset(out, plan, progress=False)
    write_dataset(out, plan, overwrite=True, progress=False)
    assert (out / "train" / "mine.txt").read_text() == "keep" and (out / "notes.txt").read_text() == "keep"
    assert verify(out) == []


# ------------------------------------------------------------------------------------- reader + verify

def test_reader_round_trip_and_verify_detects_damage(tmp_path):
    paths = _files(tmp_path / "src", 5)
    recs = [Record(f"s{i}", p.name, [i % 2], path=str(p), meta={"k": i}) for i, p in enumerate(paths)]
    out = tmp_path / "out"
    write_dataset(out, IngestPlan("toy", _classes(2), {"train": recs}, "negative"), shard_size=2, progress=False)

    ds = open_dataset(out)
    assert (ds.class_names, ds.num_classes, ds.split_names, ds.num_samples("train")) == (
        ["class0", "class1"], 2, ["train"], 5)
    assert ds.shard_paths("train") == [out / "train" / f"00000{i}.tar" for i in range(3)]
    assert ds.labels_path("train") == out / "train" / "labels.arrow"
    samples = list(ds.iter_samples("train"))
    assert [(s.sample_id, s.key, s.jpeg, s.meta["k"]) for s in samples] == [
        (i, f"00000000{i}", paths[i].read_bytes(), i) for i in range(5)]
    assert verify(out) == []
    with pytest.raises(ValueError, match="no split 'val'"):
        ds.num_samples("val")

    # one flipped byte inside a JPEG: the tar still parses, the sha256 does not match
    tar1 = out / "train" / "000001.tar"
    good = tar1.read_bytes()
    raw = bytearray(good)
    raw[1600] ^= 0x01
    tar1.write_bytes(bytes(raw))
    problems = verify(out)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tar1}: sha256 ") and "differs from manifest.json" in problems[0]
    tar1.write_bytes(good)

    # labels.arrow with one row too few
    labels = out / "train" / "labels.arrow"
    table = ipc.open_file(labels.read_bytes()).read_all()
    with ipc.new_file(str(labels), table.schema) as w:
        w.write_table(table.slice(0, 4))
    problems = verify(out)
    assert problems[-1] == f"{labels}: 4 rows, manifest.json says 5 samples"
    assert len(problems) == 2 and problems[0].startswith(f"{labels}: ")  # its size or sha256 differs

    labels.unlink()
    with pytest.raises(FormatError, match="labels.arrow: listed in manifest.json but not found; re-run ingest"):
        open_dataset(out)


# ------------------------------------------------------------------------------------------ DALI index

def test_tar_contract_round_trip(tmp_path):
    """shards.tar alone: sample layout, id codec, ustar bytes any tar reader reads, the index noted while building."""
    assert decode_sample_id(encode_sample_id(7)) == 7 and encode_sample_id(1) == struct.pack("<i", 1)
    with pytest.raises(ValueError, match="4 bytes"):
        decode_sample_id(b"\x01\x00")
    tar = TarBytes()
    data = b"".join(tar.sample(sample_members(i, _jpeg(i), json.dumps({"i": i}).encode())) for i in (7, 8)) + tar.end()
    assert len(data) == tar.size and len(data) % 512 == 0
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    with tarfile.open(path) as tf:
        assert tf.getnames() == [f"00000000{i}.{ext}" for i in (7, 8) for ext in MEMBER_EXTS]
    assert [(s.sample_id, s.key, s.jpeg, s.meta) for s in iter_samples(path)] == [
        (i, f"00000000{i}", _jpeg(i), {"i": i}) for i in (7, 8)
    ]
    assert format_dali_index(tar.members, str(path)) == dali_index_text(path)


def test_dali_index_points_at_member_bytes(tmp_path):
    paths = _files(tmp_path / "src", 3)
    recs = [Record(f"s{i}", p.name, [0], path=str(p)) for i, p in enumerate(paths)]
    out = tmp_path / "out"
    write_dataset(out, IngestPlan("toy", _classes(1), {"train": recs}, "negative"), shard_size=3, progress=False)
    tar = out / "train" / "000000.tar"
    idx_text = (out / "train" / "000000.idx").read_text()
    lines = idx_text.splitlines()
    assert lines[0] == "v1.2 3" and len(lines) == 4
    raw = tar.read_bytes()
    members = {name: data for name, data, _ in _tar_members(tar)}
    for i, line in enumerate(lines[1:]):
        f = line.split()
        assert len(f) == 12  # 3 components x (ext, offset, size, name)
        assert [f[0], f[4], f[8]] == ["idx", "jpg", "json"]
        for j in range(0, 12, 4):
            ext, off, size, name = f[j], int(f[j + 1]), int(f[j + 2]), f[j + 3]
            assert name == f"00000000{i}.{ext}" and off % 512 == 0
            assert raw[off: off + size] == members[name]
    # the first sample's jpg starts after idx header (512) + idx data block (512) + jpg header (512)
    assert lines[1].split()[:3] == ["idx", "512", "4"] and lines[1].split()[5] == "1536"
    assert dali_index_text(tar) == idx_text
    assert write_dali_index(tar, tmp_path / "again.idx") == 3
    assert (tmp_path / "again.idx").read_text() == idx_text


def test_dali_index_matches_dalis_own_tool(tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx ships with nvidia-dali")
    if shutil.which("tar") is None:
        pytest.skip("wds2idx needs GNU tar")
    paths = _files(tmp_path / "src", 2)
    recs = [Record(f"s{i}", p.name, [0], path=str(p)) for i, p in enumerate(paths)]
    out = tmp_path / "out"
    write_dataset(out, IngestPlan("toy", _classes(1), {"train": recs}, "negative"), progress=False)
    with wds2idx.IndexCreator(str(out / "train" / "000000.tar"), str(tmp_path / "dali.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "dali.idx").read_text() == (out / "train" / "000000.idx").read_text()



def test_dali_reader_returns_the_member_bytes(tmp_path):
    """DALI's own webdataset reader, on CPU, with our index files: the bytes it returns are the members'."""
    dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali is an optional dependency")
    paths = _files(tmp_path / "src", 5)
    recs = [Record(f"s{i}", p.name, [0], path=str(p)) for i, p in enumerate(paths)]
    out = tmp_path / "out"
    write_dataset(out, IngestPlan("toy", _classes(1), {"train": recs}, "negative"), shard_size=3, progress=False)
    ds = open_dataset(out)
    tars = [str(p) for p in ds.shard_paths("train")]
    idxs = [str(p) for p in ds.dali_index_paths("train")]

    @dali.pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        ids, jpgs = dali.fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["idx", "jpg"],
                                               missing_component_behavior="error", random_shuffle=False)
        return ids, jpgs

    p = pipe()
    p.build()
    ids, jpgs = p.run()
    got = [(np.array(ids[k]).tobytes(), np.array(jpgs[k]).tobytes()) for k in range(5)]
    assert got == [(struct.pack("<i", i), paths[i].read_bytes()) for i in range(5)]
