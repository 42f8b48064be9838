"""Ingest benchmarks. Run from the repository root: ``python tests/bench/ingest.py --help``.

(a) ``--part write``: images/s of ``shards.writer.write_dataset`` against ``tar -cf`` of the same
    files (N generated 500x375 JPEGs); prints the ratio (target >= 0.5). Both read the same files
    with a warm page cache (tar runs first, once untimed to warm the cache). The writer fsyncs every
    shard and tar does not, so ``tar -cf`` followed by an fsync of its output is printed as well.
(b) ``--part openimages``: time and peak RSS of the OpenImages adapter on a generated
    ``annotations-human.csv`` shaped like the real train file (20,868,755 rows over 9,011,219 images,
    the 5,000 real trainable MIDs plus non-trainable ones; ``--rows``/``--images`` scale it down):
    the streaming parse, then building every record (as if all images were on disk). Targets: peak
    RSS <= 2 GB and <= 3 minutes on 2 cores. ``--engine`` picks the parse: ``pyarrow`` (the adapter's
    ``parse_annotations``), ``polars`` (the same result from a lazy ``polars.scan_csv``, defined here:
    ``parse_annotations_polars``; needs ``pip install polars``, which is not a dependency) or ``both``
    (default: one child process per engine and run, ``--repeats`` times alternating; prints the ratio
    polars/pyarrow of the best times and of the peak RSS, and whether both results are identical).
(c) ``--part coco``: time and peak RSS of the COCO adapter's json loading and record building on a
    generated ``instances_train2014.json`` of the real size (82,783 images, 604,907 annotations with
    polygon segmentations; ``--coco-scale`` scales it).
(d) ``--part hostile``: ``--check full`` (``validate_jpeg(full=True)``) on a 16 x 8 JPEG whose header
    declares W x W pixels: at the default ``--max-pixels`` (60000 x 60000 is refused by its header;
    16384 x 16384, the largest allowed, is decoded at 1/8 scale) and with the limit lifted to 60000^2,
    against the full-size strict decode the check made before (``decode_jpeg(..., min_factor=8)``
    without a minimum size, which does not reduce the scale).

Measurements (b), (c) and (d) run in a child process that reports its own ``ru_maxrss`` (peak RSS,
interpreter and imports included; (d) reports the growth during the call). Generated inputs are
cached in ``--tmp`` (default: the system temporary folder) and reused by later runs with the same sizes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["largeloss"] = _pkg

import numpy as np  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TRAINABLE = FIXTURES / "openimages_v3" / "2017_11" / "classes-trainable.txt"

REAL_ROWS = 20_868_755
REAL_IMAGES = 9_011_219
COCO_IMAGES, COCO_ANNOTATIONS = 82_783, 604_907


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------- (a) writer vs tar

def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        paths.append(p)
        if p.exists():
            continue
        # smooth colour field + noise: compresses like a photo (~60-90 KB at quality 90)
        a, b = rng.uniform(0.005, 0.05, 2)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * (a + b) / 2)], -1)
        img = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        p.write_bytes(buf.tobytes())
    return paths


def bench_write(tmp: Path, n: int, workers: int) -> None:
    from largeloss.shards.format import UNLISTED_NEGATIVE, IngestPlan, Record
    from largeloss.shards.writer import write_dataset

    src = tmp / "jpegs"
    paths = make_jpegs(src, n)
    size = sum(p.stat().st_size for p in paths)
    tar_out = tmp / "bench.tar"
    cmd = ["tar", "-cf", str(tar_out), "-C", str(src)] + [p.name for p in paths]
    subprocess.run(cmd, check=True)  # warm the page cache
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    t_tar = time.perf_counter() - t0
    # the writer fsyncs every shard (crash safety); tar does not: also time tar + fsync of its output
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    fd = os.open(tar_out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t_tar_sync = time.perf_counter() - t0

    def plan() -> IngestPlan:
        recs = [Record(source_id=str(i), rel_path=p.name, pos=[i % 3], path=str(p)) for i, p in enumerate(paths)]
        return IngestPlan(dataset="bench", classes=[{"index": i, "id": i, "name": f"c{i}"} for i in range(3)],
                          splits={"train": recs}, unlisted=UNLISTED_NEGATIVE)

    out = tmp / "bench_out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_dataset(out, plan(), shard_size=1000, workers=workers, progress=False)
    t_write = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    tar_out.unlink(missing_ok=True)
    r_tar, r_write = n / t_tar, n / t_write
    print(f"(a) {n} JPEGs 500x375, {size / n / 1024:.0f} KiB each on average, workers={workers}")
    print(f"    tar -cf:        {t_tar:7.3f} s  {r_tar:8.0f} images/s")
    print(f"    tar -cf + fsync:{t_tar_sync:7.3f} s  {n / t_tar_sync:8.0f} images/s")
    print(f"    write_dataset:  {t_write:7.3f} s  {r_write:8.0f} images/s")
    print(f"    ratio write/tar: {r_write / r_tar:.2f}  (target >= 0.5); write/(tar + fsync): "
          f"{t_tar_sync / t_write:.2f}")


# ------------------------------------------------------------------------------- (b) OpenImages parse

def generate_openimages_csv(path: Path, rows: int, images: int, extra_classes: int = 2000, seed: int = 0) -> None:
    """An annotations-human.csv shaped like the real train file, written with numpy + pyarrow.

    Every image gets 1 + a multinomial share of the remaining rows (mean rows/image as in the real
    file); rows of one image are contiguous, images in random (not sorted) order. 85 % of the rows
    name a trainable MID (skewed: a few classes are very frequent, as in OpenImages), 15 % one of
    ``extra_classes`` non-trainable MIDs; Confidence is 1 with probability 0.47 (9.74M / 20.87M in
    the real file). Random repeats of a class within an image exercise the duplicate/conflict paths.
    """
    import pyarrow as pa

    if rows < images:
        raise SystemExit(f"--rows ({rows}) must be >= --images ({images}): every image has a row")
    rng = np.random.default_rng(seed)
    trainable = [s.strip() for s in TRAINABLE.read_text().splitlines() if s.strip()]
    mids = pa.array(trainable + [f"/m/zz{i:06d}" for i in range(extra_classes)], pa.string())
    sources = pa.array(["verification", "crowdsource-verification"], pa.string())
    per_image = 1 + np.bincount(rng.integers(0, images, rows - images), minlength=images)
    ids = np.frombuffer(rng.bytes(8 * images).hex().encode(), dtype="S16")
    schema = pa.schema([("ImageID", pa.string()), ("Source", pa.string()), ("LabelName", pa.string()),
                        ("Confidence", pa.int8())])
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as sink:
        sink.write(b"ImageID,Source,LabelName,Confidence\n")  # unquoted, as in the real file
        _write_rows(sink, schema, per_image, ids, rng, mids, sources, len(trainable), extra_classes, images)
    os.replace(tmp, path)


def _write_rows(sink, schema, per_image, ids, rng, mids, sources, n_trainable, extra_classes, images) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    ends = np.cumsum(per_image)
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with pacsv.CSVWriter(sink, schema, write_options=opts) as w:
        first = 0
        while first < images:
            last = min(images, int(np.searchsorted(ends, ends[first] + 2_000_000)) + 1)
            counts = per_image[first:last]
            n = int(counts.sum())
            img = np.repeat(np.arange(first, last), counts)
            trainable_row = rng.random(n) < 0.85
            cls = np.where(trainable_row, (n_trainable * rng.random(n) ** 3).astype(np.int64),
                           n_trainable + rng.integers(0, extra_classes, n))
            table = pa.table({
                "ImageID": pa.array(ids[img]).cast(pa.string()),
                "Source": sources.take(pa.array(rng.integers(0, 2, n))),
                "LabelName": mids.take(pa.array(cls)),
                "Confidence": pa.array((rng.random(n) < 0.47).astype(np.int8)),
            }, schema=schema)
            w.write_table(table)
            first = last


def parse_annotations_polars(path: Path, mids: list[str]):
    """``openimages.parse_annotations`` (same ``ParsedSplit``, same counts) with polars instead of pyarrow.

    A lazy ``pl.scan_csv`` of every column as a string (a projection would let rows with extra fields pass
    unseen: the reader skips the rest of a line), LabelName joined against the trainable MIDs, Confidence
    checked and cast in the query; per batch of 65,536 rows the distinct ImageIDs (hash, in order of first
    occurrence) and each trainable row's code into them (join); then one sort of the concatenated batch
    dictionaries (rank of each code) and the adapter's own numpy CSR step (``_csr``). What the adapter skips
    or names by line (malformed rows, empty fields, a bad Confidence or ImageID) only raises here: the
    benchmark input has none."""
    import polars as pl
    import pyarrow as pa

    from largeloss.ingest.openimages import _csr
    from largeloss.shards.format import IngestError

    lf = pl.scan_csv(path, infer_schema=False, null_values=[""])
    names = lf.collect_schema().names()
    if not {"ImageID", "LabelName", "Confidence"} <= set(names):
        raise IngestError(f"{path}:1: header must name ImageID, LabelName and Confidence, got {names}")
    mid_index = pl.LazyFrame({"LabelName": mids, "_cls": pl.Series(np.arange(len(mids), dtype=np.uint16))})
    conf = pl.col("Confidence").cast(pl.Float32, strict=False)
    q = (lf.select(pl.col("ImageID"), pl.col("LabelName"), _val=(conf == 1).cast(pl.UInt8),
                   _ok=pl.all_horizontal(pl.all().is_not_null()) & ((conf == 0) | (conf == 1)).fill_null(False))
         .join(mid_index, on="LabelName", how="left")
         .select("ImageID", "_cls", "_val", "_ok"))
    batch_dicts: list = []
    pre_codes: list = []
    classes: list = []
    values: list = []
    dict_offset = rows = non_trainable = 0
    for batch in q.collect_batches(chunk_size=1 << 16, maintain_order=False):
        n = batch.height
        if n == 0:
            continue
        if not batch["_ok"].all():
            raise IngestError(f"{path}: a row with an empty or missing field or a Confidence other than 0 or 1")
        distinct = batch["ImageID"].unique(maintain_order=True)
        kept = batch.filter(pl.col("_cls").is_not_null()).join(
            distinct.to_frame().with_row_index("_code"), on="ImageID", how="left")
        batch_dicts.append(distinct)
        pre_codes.append(kept["_code"].to_numpy().astype(np.uint32) + np.uint32(dict_offset))
        classes.append(kept["_cls"].to_numpy())
        values.append(kept["_val"].to_numpy())
        dict_offset += len(distinct)
        rows += n
        non_trainable += n - kept.height
    if not batch_dicts:
        return _csr(path, pa.array([], pa.string()), np.zeros(0, np.uint64), [], [], [], rows, non_trainable, 0)
    # compacted through Arrow: each batch's polars string views point into that batch's whole ImageID buffer,
    # which keeps every row's bytes alive and makes the sort below about twice as slow
    all_ids = pl.from_arrow(pa.concat_arrays([d.to_arrow() for d in batch_dicts]))
    del batch_dicts[:]
    order = all_ids.arg_sort()
    sorted_ids = all_ids.gather(order)
    del all_ids
    order = order.to_numpy()
    first = np.ones(len(sorted_ids), bool)
    first[1:] = (sorted_ids.slice(1) != sorted_ids.slice(0, len(sorted_ids) - 1)).to_numpy()
    distinct = sorted_ids.filter(pl.Series(first))
    del sorted_ids
    if distinct.str.contains("/", literal=True).any() or distinct.str.contains("\x00", literal=True).any():
        raise IngestError(f"{path}: an ImageID that is not a plain file name")
    image_ids = distinct.to_arrow().cast(pa.string())
    del distinct
    code_to_rank = np.empty(len(order), np.uint64)
    code_to_rank[order] = np.cumsum(first, dtype=np.uint64) - np.uint64(1)
    del order, first
    return _csr(path, image_ids, code_to_rank, pre_codes, classes, values, rows, non_trainable, 0)


def parsed_digest(parsed) -> str:
    """sha256 of a ParsedSplit's ImageIDs, CSR arrays and counts: equal results, equal digests."""
    import hashlib

    h = hashlib.sha256()
    ids = parsed.image_ids
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset: ids.offset + len(ids) + 1]
    h.update((offsets - offsets[0]).tobytes())
    if len(ids):
        h.update(memoryview(ids.buffers()[2])[int(offsets[0]): int(offsets[-1])])
    for a in (parsed.pos_offsets, parsed.pos_classes, parsed.neg_offsets, parsed.neg_classes):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([parsed.rows, parsed.counts], sort_keys=True).encode())
    return h.hexdigest()


def child_openimages(csv_path: str, engine: str) -> None:
    import pyarrow as pa

    from largeloss.ingest.openimages import SplitRecords, parse_annotations, read_trainable

    mids = read_trainable(TRAINABLE)
    parse = parse_annotations_polars if engine == "polars" else parse_annotations
    t0 = time.perf_counter()
    parsed = parse(Path(csv_path), mids)
    t_parse = time.perf_counter() - t0
    rss_parse = peak_rss_mb()
    digest = parsed_digest(parsed)
    # the on-disk check of build(): 3,448,376 / 9,011,219 of the images (the paper's downloadable
    # share) as the listing of the image folder, looked up with one hash join
    import pyarrow.compute as pc

    rng = np.random.default_rng(1)
    n_disk = round(len(parsed.image_ids) * 3_448_376 / REAL_IMAGES)
    listing = parsed.image_ids.take(pa.array(np.sort(rng.choice(len(parsed.image_ids), n_disk, replace=False))))
    t0 = time.perf_counter()
    present = pc.is_in(parsed.image_ids, value_set=listing).to_numpy(zero_copy_only=False)
    t_disk = time.perf_counter() - t0
    assert int(present.sum()) == n_disk
    del listing, present
    # every image with a label as if it were on disk: the worst case for record building
    recs = SplitRecords(parsed, parsed.num_labels > 0, Path("/images/train"), "train/")
    t0 = time.perf_counter()
    n = n_pos = n_neg = 0
    for r in recs:
        n += 1
        n_pos += len(r.pos)
        n_neg += len(r.neg)
    t_iter = time.perf_counter() - t0
    print(json.dumps({"parse_s": t_parse, "records_s": t_iter, "on_disk_s": t_disk, "on_disk": n_disk,
                      "records": n, "pos": n_pos, "neg": n_neg, "digest": digest,
                      "images": len(parsed.image_ids), "rows": parsed.rows, "counts": parsed.counts,
                      "peak_rss_after_parse_mb": rss_parse, "peak_rss_mb": peak_rss_mb(),
                      "arrow_pool_peak_mb": pa.default_memory_pool().max_memory() / 2**20}))


def bench_openimages(tmp: Path, rows: int, images: int, engine: str = "both", repeats: int = 1) -> None:
    csv_path = tmp / f"oi_annotations_{rows}_{images}.csv"
    if not csv_path.exists():
        t0 = time.perf_counter()
        generate_openimages_csv(csv_path, rows, images)
        print(f"(b) generated {csv_path} ({csv_path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.0f} s")
    engines = ["pyarrow", "polars"] if engine == "both" else [engine]
    if "polars" in engines and importlib.util.find_spec("polars") is None:
        if engine == "polars":
            raise SystemExit("--engine polars: polars is not installed (not a dependency): pip install polars")
        print("(b) polars is not installed (not a dependency; pip install polars): measuring pyarrow only")
        engines = ["pyarrow"]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(repeats):
        for e in engines:  # alternating, so that load from other work falls on both
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child-openimages", str(csv_path), "--engine", e],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t0
            runs[e].append(r)
    r = runs[engines[0]][0]
    print(f"(b) OpenImages annotations-human.csv: {r['rows']:,} rows, {r['images']:,} images, cpus={os.cpu_count()}, "
          f"{repeats} run(s) per engine")
    best = {}
    for e in engines:
        b = best[e] = {"parse_s": min(x["parse_s"] for x in runs[e]), "wall_s": min(x["wall_s"] for x in runs[e]),
                       "rss_parse": max(x["peak_rss_after_parse_mb"] for x in runs[e]),
                       "rss": max(x["peak_rss_mb"] for x in runs[e])}
        r = runs[e][0]

        def times(key: str, e: str = e) -> str:
            return ", ".join(f"{x[key]:.1f}" for x in runs[e])

        print(f"  {e}: parse {times('parse_s')} s + build {r['records']:,} records {times('records_s')} s; child wall "
              f"{times('wall_s')} s (with interpreter start and imports)")
        print(f"    peak RSS {b['rss']:.0f} MiB (after the parse: {b['rss_parse']:.0f} MiB; Arrow pool peak "
              f"{max(x['arrow_pool_peak_mb'] for x in runs[e]):.0f} MiB)   targets: <= 2048 MiB, <= 180 s")
    print(f"    on-disk lookup of {r['images']:,} ImageIDs in a listing of {r['on_disk']:,}: {r['on_disk_s']:.1f} s")
    print(f"    labels kept: {r['pos']:,} pos / {r['neg']:,} neg; row counts {r['counts']}")
    if len(engines) == 2:
        a, b = best["pyarrow"], best["polars"]
        same = len({x["digest"] for e in engines for x in runs[e]}) == 1
        print(f"    ratio polars/pyarrow (best times, highest RSS): parse x{b['parse_s'] / a['parse_s']:.2f}, "
              f"child wall x{b['wall_s'] / a['wall_s']:.2f}, peak RSS after the parse "
              f"x{b['rss_parse'] / a['rss_parse']:.2f}, peak RSS x{b['rss'] / a['rss']:.2f}; "
              f"results {'identical' if same else 'DIFFER'}")


# ------------------------------------------------------------------------------------ (c) COCO json

def generate_coco_json(path: Path, images: int, annotations: int, seed: int = 0) -> None:
    """An instances json of the real shape, written as text piece by piece (never held as objects)."""
    rng = np.random.default_rng(seed)
    cats = json.loads((FIXTURES / "coco2014" / "annotations" / "instances_train2014.json").read_text())["categories"]
    cat_ids = [c["id"] for c in cats]
    img_ids = np.sort(rng.choice(600_000, images, replace=False))
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "generated"}, "images": [')
        for i, iid in enumerate(img_ids.tolist()):
            f.write(("," if i else "") + json.dumps({
                "license": 3, "file_name": f"COCO_train2014_{iid:012d}.jpg", "coco_url": "http://x/y.jpg",
                "height": 480, "width": 640, "date_captured": "2013-11-14 11:18:45",
                "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg", "id": iid}))
        f.write('], "licenses": [], "annotations": [')
        owner = rng.choice(img_ids, annotations)
        for a in range(annotations):
            crowd = rng.random() < 0.01
            if crowd:
                seg = {"counts": rng.integers(0, 500, 300).tolist(), "size": [480, 640]}
            else:  # polygons of ~37 vertices on average, 2-decimal floats: ~450 MB in all, as the real file
                seg = [np.round(rng.uniform(0, 640, 2 * int(rng.integers(10, 64))), 2).tolist()]
            f.write(("," if a else "") + json.dumps({
                "segmentation": seg, "area": 1234.5, "iscrowd": int(crowd), "image_id": int(owner[a]),
                "bbox": np.round(rng.uniform(0, 300, 4), 2).tolist(), "category_id": cat_ids[a % 80], "id": a + 1}))
        f.write('], "categories": ' + json.dumps(cats) + "}")
    os.replace(tmp, path)


def child_coco(json_path: str) -> None:
    from largeloss.ingest import coco

    t0 = time.perf_counter()
    data = coco.load_instances(Path(json_path))
    t_load = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    classes = coco.parse_categories(data["categories"], Path(json_path))
    t0 = time.perf_counter()
    recs, counts = coco.split_records(data, Path(json_path), Path("/coco/train2014"), "train2014",
                                      {c["id"]: c["index"] for c in classes}, keep_empty=False, strict=False)
    t_rec = time.perf_counter() - t0
    del data
    print(json.dumps({"load_s": t_load, "records_s": t_rec, "records": len(recs), "counts": counts,
                      "peak_rss_after_load_mb": rss_load, "peak_rss_mb": peak_rss_mb()}))


def bench_coco(tmp: Path, scale: float) -> None:
    n_img, n_ann = int(COCO_IMAGES * scale), int(COCO_ANNOTATIONS * scale)
    path = tmp / f"coco_instances_{n_img}_{n_ann}.json"
    if not path.exists():
        t0 = time.perf_counter()
        generate_coco_json(path, n_img, n_ann)
        print(f"(c) generated {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child-coco", str(path)], check=True, capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"(c) COCO json {path.stat().st_size / 2**20:.0f} MiB, {n_img:,} images, {n_ann:,} annotations")
    print(f"    load {r['load_s']:.1f} s + records {r['records_s']:.1f} s ({r['records']:,}); child wall {wall:.1f} s")
    print(f"    peak RSS {r['peak_rss_mb']:.0f} MiB (after json load: {r['peak_rss_after_load_mb']:.0f} MiB)")


# ------------------------------------------------------------------------- (d) --check full, hostile headers

def child_hostile(spec: str) -> None:
    import simplejpeg

    from largeloss.shards.jpeg import CorruptImage, validate_jpeg

    side, limit, how = spec.split(":")
    side, limit = int(side), int(limit)
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((8, 16, 3), np.uint8), quality=90))
    sof = data.find(b"\xff\xc0")  # SOF0: precision (1 byte), then height and width (2 bytes each)
    data[sof + 5: sof + 9] = side.to_bytes(2, "big") * 2
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        if how == "ours":
            validate_jpeg(bytes(data), full=True, max_pixels=limit)
        else:  # the check before: a strict decode at full size
            simplejpeg.decode_jpeg(bytes(data), colorspace="GRAY", min_factor=8, strict=True)
        outcome = "accepted"
    except (CorruptImage, ValueError) as e:
        outcome = str(e)[:70]
    print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": peak_rss_mb() - rss0, "outcome": outcome}))


def bench_hostile() -> None:
    from largeloss.shards.jpeg import DEFAULT_MAX_PIXELS

    def run(spec: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child-hostile", spec], check=True, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for side, limit in ((60000, DEFAULT_MAX_PIXELS), (16384, DEFAULT_MAX_PIXELS), (60000, 60000**2)):
        ours, before = run(f"{side}:{limit}:ours"), run(f"{side}:{limit}:before")
        print(f"(d) {side}x{side} declared, --max-pixels {limit}: {ours['s'] * 1000:.1f} ms, +{ours['rss_mb']:.0f} MiB "
              f"({ours['outcome']}); full-size decode: {before['s'] * 1000:.0f} ms, +{before['rss_mb']:.0f} MiB; "
              f"time x{ours['s'] / before['s']:.4f}, memory x{max(ours['rss_mb'], 0.01) / before['rss_mb']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="write,openimages",
                   help="comma-separated parts: write (a), openimages (b), coco (c), hostile (d) "
                        "(default write,openimages)")
    p.add_argument("--jpegs", type=int, default=500, help="(a) number of JPEGs (default 500)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="(a) writer threads")
    p.add_argument("--rows", type=int, default=REAL_ROWS, help=f"(b) CSV rows (default {REAL_ROWS:,}, the real file)")
    p.add_argument("--images", type=int, default=None,
                   help=f"(b) distinct images (default rows x {REAL_IMAGES / REAL_ROWS:.3f}, as in the real file)")
    p.add_argument("--engine", choices=["pyarrow", "polars", "both"], default="both",
                   help="(b) the parse to measure: the adapter's (pyarrow), the polars one defined here, or both "
                        "(default), with their ratio")
    p.add_argument("--repeats", type=int, default=1, help="(b) runs per engine, alternating (default 1)")
    p.add_argument("--coco-scale", type=float, default=1.0, help="(c) fraction of the real train2014 json size")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()) / "largeloss_bench_ingest",
                   help="folder for generated inputs, reused between runs")
    p.add_argument("--child-openimages", help=argparse.SUPPRESS)
    p.add_argument("--child-coco", help=argparse.SUPPRESS)
    p.add_argument("--child-hostile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_hostile:
        child_hostile(args.child_hostile)
        return 0
    if args.child_openimages:
        child_openimages(args.child_openimages, args.engine)
        return 0
    if args.child_coco:
        child_coco(args.child_coco)
        return 0
    args.tmp.mkdir(parents=True, exist_ok=True)
    parts = [s.strip() for s in args.part.split(",") if s.strip()]
    for part in parts:
        if part == "write":
            bench_write(args.tmp, args.jpegs, args.workers)
        elif part == "openimages":
            images = args.images if args.images is not None else max(1, round(args.rows * REAL_IMAGES / REAL_ROWS))
            bench_openimages(args.tmp, args.rows, images, args.engine, args.repeats)
        elif part == "coco":
            bench_coco(args.tmp, args.coco_scale)
        elif part == "hostile":
            bench_hostile()
        else:
            raise SystemExit(f"unknown --part {part!r}; choose from write, openimages, coco, hostile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
