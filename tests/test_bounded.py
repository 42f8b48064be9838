"""``ingest --max-side N [--quality Q]``: bounded-size shards (shards/jpeg.py ``reencode_bounded``, shards/writer.py).

Exact output sizes, the stored bytes, labels and boxes, the manifest fields, the resume fingerprint, the
full-check path, grayscale and CMYK sources, and that the default (off) writes what earlier versions wrote.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import simplejpeg
from PIL import Image

import largeloss.ingest.cli as cli
import largeloss.shards.writer as writer
from largeloss.shards.format import IngestError, IngestPlan, Record, read_manifest
from largeloss.shards.jpeg import (
    DEFAULT_QUALITY,
    bounded_size,
    decode_image,
    decode_rgb,
    reencode_bounded,
    resize_planes,
)
from largeloss.shards.reader import verify
from largeloss.shards.writer import write_dataset


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: JPEG-friendly, so that re-encoding errors stay small."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64], -1)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    return simplejpeg.encode_jpeg(_photo(w, h, seed), quality=90, colorsubsampling="420")


def _pil_jpeg(w: int, h: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(w, h)).convert(mode).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _members(out: Path, split: str = "train") -> dict[str, bytes]:
    found = {}
    for tar in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            found.update({m.name: tf.extractfile(m).read() for m in tf})
    return found


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}


# (source width, height) -> stored (width, height) at --max-side 256; None: stored unchanged
SIZES = {
    (1024, 768): (256, 192),  # landscape 4:3
    (768, 1024): (192, 256),  # portrait
    (900, 600): (256, 171),  # 170.67 rounds up
    (1000, 300): (256, 77),  # 76.8
    (2000, 3): (256, 1),  # 0.384: at least one pixel
    (256, 256): None,  # longer side == N: kept
    (200, 120): None,  # already small: kept
}


def test_bounded_size():
    for (w, h), want in SIZES.items():
        assert bounded_size(w, h, 256) == want, (w, h)
    assert bounded_size(3, 2000, 256) == (1, 256)
    assert bounded_size(1025, 768, 512) == (512, 384)  # 383.6 -> 384


def _records(root: Path) -> tuple[list[Record], dict[str, bytes]]:
    root.mkdir(parents=True, exist_ok=True)
    recs, src = [], {}
    for i, (w, h) in enumerate(SIZES):
        p = root / f"img{i}.jpg"
        if not p.exists():  # written once: a resumed run must see the same files (size and mtime)
            p.write_bytes(_jpeg(w, h, seed=i))
        src[f"{i:09d}"] = p.read_bytes()
        meta = {"boxes": [{"class": i % 2, "bbox": [w / 4, h / 2, w / 2, h * 0.75], "difficult": 0}]} if i < 2 else {}
        recs.append(Record(f"s{i}", p.name, pos=[i % 2], neg=[1 - i % 2] if i % 3 == 0 else [], path=str(p),
                           meta=meta))
    return recs, src


def _plan(root: Path) -> IngestPlan:
    recs, _ = _records(root)
    return IngestPlan("toy", [{"index": i, "id": f"c{i}", "name": f"c{i}"} for i in range(2)], {"train": recs},
                      "unknown", source={"root": "src"})


def test_max_side_reencodes_to_exact_sizes_and_keeps_labels(tmp_path):
    plan = _plan(tmp_path / "src")
    _, src = _records(tmp_path / "src")
    m = write_dataset(tmp_path / "out", plan, shard_size=3, max_side=256, progress=False)
    plain = write_dataset(tmp_path / "plain", _plan(tmp_path / "src"), shard_size=3, progress=False)
    members = _members(tmp_path / "out")

    for i, ((w, h), want) in enumerate(SIZES.items()):
        key = f"{i:09d}"
        data, meta = members[f"{key}.jpg"], json.loads(members[f"{key}.json"])
        sh, sw, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if want is None:
            assert data == src[key]  # byte-identical: never re-encoded
            assert meta == {"source_id": f"s{i}", "rel_path": f"img{i}.jpg", "width": w, "height": h}
            continue
        assert (sw, sh) == want and colorspace == "YCbCr"
        assert data == reencode_bounded(src[key], 256, DEFAULT_QUALITY)[0]  # what the writer stores, exactly
        assert (meta["width"], meta["height"], meta["source_width"], meta["source_height"]) == (*want, w, h)
        if i < 2:  # boxes follow the pixels: the same fractions of the stored image
            assert meta["boxes"] == [{"class": i % 2, "difficult": 0,
                                      "bbox": [want[0] / 4, want[1] / 2, want[0] / 2, want[1] * 0.75]}]

    # labels, ids and shards are those of the run without --max-side
    labels = [ipc.open_file(pa.memory_map(str(d / "train" / "labels.arrow"))).read_all().to_pydict()
              for d in (tmp_path / "out", tmp_path / "plain")]
    assert labels[0] == labels[1]
    assert [(s.first_sample, s.num_samples) for s in m.splits["train"].shards] == [
        (s.first_sample, s.num_samples) for s in plain.splits["train"].shards]
    assert m.splits["train"].positives_per_class == plain.splits["train"].positives_per_class

    # the manifest records N, Q and how many were re-encoded
    assert m.source["ingest"] == {"writer_version": 1, "shard_size": 3, "strict": False, "check": "fast",
                                  "max_pixels": 2**28, "max_side": 256, "quality": 90}
    assert m.counts["train"] == {"listed": 7, "written": 7, "missing": 0, "corrupt": 0, "skipped": {},
                                 "reencoded": 5, "problems": []}
    assert read_manifest(tmp_path / "out") == m
    assert writer.summary_table(m).splitlines()[2] == (
        "re-encoded at longer side 256 (--max-side; JPEG quality 90): train 5")
    assert "re-encoded" not in writer.summary_table(plain)
    assert verify(tmp_path / "out") == []
    # the loaders' decode of a re-encoded image is close to that of its source (JPEG q90 + the same filter)
    for key in ("000000000", "000000001"):
        diff = np.abs(decode_image(members[f"{key}.jpg"], 64).astype(int) - decode_image(src[key], 64))
        assert diff.mean() < 1.5, key


def test_default_off_writes_what_earlier_versions_wrote(tmp_path):
    """No --max-side: every source byte stored as it is and no new key in the manifest, state or sidecars, so
    the output is byte for byte what the writer wrote before the option existed."""
    _, src = _records(tmp_path / "src")
    m = write_dataset(tmp_path / "out", _plan(tmp_path / "src"), shard_size=3, progress=False)
    members = _members(tmp_path / "out")
    assert {k: v for k, v in members.items() if k.endswith(".jpg")} == {f"{k}.jpg": v for k, v in src.items()}
    assert all(set(json.loads(v)) == {"source_id", "rel_path", "width", "height"} | ({"boxes"} if "boxes" in
               json.loads(v) else set()) for k, v in members.items() if k.endswith(".json"))
    assert m.source["ingest"] == {"writer_version": 1, "shard_size": 3, "strict": False, "check": "fast",
                                  "max_pixels": 2**28}
    assert list(m.counts["train"]) == ["listed", "written", "missing", "corrupt", "skipped", "problems"]
    state = json.loads((tmp_path / "out" / ".ingest" / "state.json").read_text())["fingerprint"]
    assert "max_side" not in state and "quality" not in state
    for sidecar in (tmp_path / "out" / ".ingest" / "train").glob("*.json"):
        assert "reencoded" not in json.loads(sidecar.read_text())


def test_resume_refused_on_changed_max_side_or_quality(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_dataset(tmp_path / "ref", _plan(tmp_path / "src"), shard_size=2, max_side=256, progress=False)
    reference = _tree(tmp_path / "ref")

    from test_writer import crash_after_second_commit

    real_commit = crash_after_second_commit(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(out, _plan(tmp_path / "src"), shard_size=2, max_side=256, progress=False)
    monkeypatch.setattr(writer, "_commit_shard", real_commit)

    for kwargs, diff in (({"max_side": 512}, "max_side: was 256, now 512"),
                         ({"max_side": 256, "quality": 80}, "quality: was 90, now 80"),
                         ({}, "max_side: was 256, now absent")):
        with pytest.raises(IngestError, match=f"other inputs or arguments \\(.*{diff}.*\\)"):
            write_dataset(out, _plan(tmp_path / "src"), shard_size=2, progress=False, **kwargs)
    # the same arguments resume it: the kept shards' re-encoded counts come from their sidecars
    m = write_dataset(out, _plan(tmp_path / "src"), shard_size=2, max_side=256, progress=False)
    assert m.counts["train"]["reencoded"] == 5
    assert _tree(out) == reference


def test_full_check_then_reencode(tmp_path):
    recs, _ = _records(tmp_path / "src")
    good = _jpeg(640, 480, seed=9)
    scan = good.index(b"\xff\xda")
    damaged = good[: scan + 300] + b"\xff\xd3" + good[scan + 300:]  # a misplaced restart marker in the scan data
    recs.append(Record("bad", "bad.jpg", pos=[0], data=damaged))
    plan = IngestPlan("toy", [{"index": 0, "id": "c0", "name": "c0"}, {"index": 1, "id": "c1", "name": "c1"}],
                      {"train": recs}, "unknown")
    fast = write_dataset(tmp_path / "fast", plan, shard_size=3, max_side=256, progress=False)
    full = write_dataset(tmp_path / "full", plan, shard_size=3, max_side=256, check="full", progress=False)
    # fast: the damaged image passes the structure check and is decoded (libjpeg warns) and re-encoded
    assert (fast.counts["train"]["written"], fast.counts["train"]["reencoded"]) == (8, 6)
    # full: it is refused by the strict decode before any re-encoding; the others are stored as with fast
    assert (full.counts["train"]["written"], full.counts["train"]["corrupt"], full.counts["train"]["reencoded"]) == (
        7, 1, 5)
    assert "does not decode cleanly" in full.counts["train"]["problems"][0][3]
    fast_members, full_members = _members(tmp_path / "fast"), _members(tmp_path / "full")
    assert all(fast_members[k] == full_members[k] for k in full_members if k < "000000007")


def test_max_pixels_applies_to_the_source(tmp_path):
    recs, _ = _records(tmp_path / "src")
    plan = IngestPlan("toy", [{"index": 0, "id": "c0", "name": "c0"}, {"index": 1, "id": "c1", "name": "c1"}],
                      {"train": recs}, "unknown")
    # 1024 x 768 = 786,432 pixels in the source: refused, although its re-encoded 256 x 192 would fit
    m = write_dataset(tmp_path / "out", plan, max_side=256, max_pixels=768 * 768, progress=False)
    assert m.counts["train"]["corrupt"] == 2 and m.counts["train"]["reencoded"] == 3
    assert {p[2] for p in m.counts["train"]["problems"]} == {"img0.jpg", "img1.jpg"}


def test_grayscale_stays_gray_and_cmyk_becomes_rgb():
    gray, cmyk = _pil_jpeg(800, 600, "L"), _pil_jpeg(600, 800, "CMYK")
    assert simplejpeg.decode_jpeg_header(gray)[2] == "Gray" and simplejpeg.decode_jpeg_header(cmyk)[2] == "CMYK"

    data, w, h = reencode_bounded(gray, 256, 90)
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    assert (w, h, width, height, colorspace) == (256, 192, 256, 192, "Gray")  # one channel, a third of the bytes
    rgb = decode_rgb(data, 256)
    assert rgb.shape == (192, 256, 3) and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()

    data, w, h = reencode_bounded(cmyk, 256, 90)
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    assert (w, h, width, height, colorspace) == (192, 256, 192, 256, "YCbCr")  # converted to RGB by libjpeg-turbo
    want = resize_planes(decode_rgb(cmyk, 10**6), (256, 192)).transpose(1, 2, 0).astype(int)
    assert np.abs(decode_rgb(data, 10**6).astype(int) - want).mean() < 2


def test_cli_max_side_and_quality(tmp_path, capsys):
    from test_voc import _make_tree  # VOC layout, 16 x 8 px images a (cat), e (dog, person), f (cat)

    root = _make_tree(tmp_path)
    argv = ["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
            "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path / "out"), "--max-side", "12", "--quality", "75"]) == 0
    m = read_manifest(tmp_path / "out")
    assert (m.source["ingest"]["max_side"], m.source["ingest"]["quality"]) == (12, 75)
    assert m.counts["train"]["reencoded"] == m.counts["train"]["written"] > 0  # 16 x 8 -> 12 x 6
    meta = json.loads(_members(tmp_path / "out")["000000000.json"])
    assert (meta["width"], meta["height"], meta["source_width"], meta["source_height"]) == (12, 6, 16, 8)
    assert cli.main(argv + ["--out", str(tmp_path / "o2"), "--max-side", "12"]) == 0
    assert read_manifest(tmp_path / "o2").source["ingest"]["quality"] == DEFAULT_QUALITY
    capsys.readouterr()
    for bad, message in ((["--quality", "80"], "give --max-side N too"), (["--max-side", "0"], "positive integer"),
                         (["--max-side", "9", "--quality", "101"], "at most 100")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv + ["--out", str(tmp_path / "o3")] + bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
