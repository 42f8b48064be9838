"""ingest/cub.py on the real fixture files (images.txt subset, attributes.txt, split, images) with a
generated image_attribute_labels.txt for those 22 ids, malformed lines included."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES
from largeloss.ingest import cub
from largeloss.shards.format import UNLISTED_NEGATIVE, IngestError

FIX = FIXTURES / "cub200_2011"
IDS = [1, 2, 61, 62, 121, 122, 179, 180, 239, 240, 283, 284, 324, 325, 377, 378, 425, 426, 448, 484, 485, 1401]
TRAIN_IDS = [2, 62, 121, 122, 283, 284, 324, 377, 378, 426, 484, 485, 1401]  # the real train_test_split.txt


def present(iid: int, a: int) -> int:
    """The generated is_present of image ``iid``, attribute ``a`` (1-based)."""
    return 1 if (iid * 7 + a) % 5 == 0 else 0


def certainty(iid: int, a: int) -> int:
    return 1 + (iid + a) % 4


# Image 2, attribute 6 (positive: (14 + 6) % 5 == 0) is written as a line with an extra field, as
# reported for the real file; image 61, attribute 300 (negative) is written twice, the repeat saying
# is_present 1 (the first row wins); image 1401, attribute 312 has no row at all.
MALFORMED = "2 6 1 3 0 27.345"


def labels_text(eol: str = "\n", malformed: bool = True, override: dict | None = None) -> str:
    lines = []
    for iid in IDS:
        for a in range(1, 313):
            if (iid, a) == (1401, 312):
                continue
            if (iid, a) == (2, 6) and malformed:
                lines.append(MALFORMED)
            elif override and (iid, a) in override:
                lines.append(override[iid, a])
            else:
                lines.append(f"{iid} {a} {present(iid, a)} {certainty(iid, a)} {(iid + a) % 60}.{a % 1000:03d}")
            if (iid, a) == (61, 300):
                lines.append("61 300 1 4 1.000")
    return "".join(s + eol for s in lines)


def make_tree(tmp: Path, attributes_at: str = "archive", eol: str = "\n") -> Path:
    root = tmp / "cub"
    c = root / "CUB_200_2011"
    (c / "attributes").mkdir(parents=True)
    for name in ("images.txt", "train_test_split.txt"):
        shutil.copyfile(FIX / "CUB_200_2011" / name, c / name)
    (c / "images").symlink_to(FIX / "CUB_200_2011" / "images", target_is_directory=True)
    dest = {"archive": root, "cub": c, "attributes": c / "attributes"}[attributes_at]
    shutil.copyfile(FIX / "attributes.txt", dest / "attributes.txt")
    (c / "attributes" / "image_attribute_labels.txt").write_bytes(labels_text(eol).encode())
    return root


def line_of(iid: int, a: int) -> int:
    """The 1-based line of (iid, a) in labels_text (for the expected error messages)."""
    n = 0
    for i in IDS:
        for b in range(1, 313):
            if (i, b) == (1401, 312):
                continue
            n += 1
            if (i, b) == (iid, a):
                return n
            if (i, b) == (61, 300):
                n += 1
    raise KeyError((iid, a))


def test_fixture_attribute_names():
    classes = cub.read_attributes(FIX / "attributes.txt")
    assert len(classes) == 312
    assert classes[0] == {"index": 0, "id": 1, "name": "has_bill_shape::curved_(up_or_down)"}
    assert classes[311] == {"index": 311, "id": 312, "name": "has_wing_pattern::multi-colored"}


@pytest.mark.parametrize("attributes_at,eol", [("archive", "\n"), ("cub", "\r\n"), ("attributes", "\n")])
def test_exact_labels(tmp_path: Path, attributes_at: str, eol: str):
    root = make_tree(tmp_path, attributes_at, eol)
    plan = cub.plan(root)
    assert plan.dataset == "cub" and plan.unlisted == UNLISTED_NEGATIVE and len(plan.classes) == 312
    train, test = plan.splits["train"], plan.splits["test"]
    assert [int(r.source_id) for r in train] == TRAIN_IDS
    assert [int(r.source_id) for r in test] == [i for i in IDS if i not in TRAIN_IDS]
    for r in train + test:
        iid = int(r.source_id)
        want = [a - 1 for a in range(1, 313) if present(iid, a)]
        want_cert = [certainty(iid, a) for a in range(1, 313)]
        if iid == 2:  # the malformed line is skipped: attribute 6 negative, certainty 0
            assert present(2, 6) == 1
            want = [x for x in want if x != 5]
            want_cert[5] = 0
        if iid == 61:  # first row of the repeated pair wins (is_present as generated)
            assert present(61, 300) == 0
        if iid == 1401:  # no row for attribute 312
            want = [x for x in want if x != 311]
            want_cert[311] = 0
        assert r.pos == want, iid
        assert r.neg == []
        assert r.meta == {"certainty": want_cert}
    assert train[0].pos[:4] == [0, 10, 15, 20]  # image 2: a = 1, 11, 16, 21 (6 was malformed)
    assert train[0].meta["certainty"][:7] == [4, 1, 2, 3, 4, 0, 2]  # 1 + (2 + a) % 4; 0 for a = 6
    # images.txt paths verbatim (folder "Black_footed", file "Black_Footed")
    r2 = train[0]
    assert r2.rel_path == "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg"
    assert Path(r2.path).is_file()
    assert all(Path(r.path).is_file() for r in train + test)  # grayscale 448 and 1401 included
    assert plan.counts == {
        "train": {"listed": 13, "skipped": {}, "malformed_lines": 1, "duplicate_rows": 0, "pairs_without_row": 2},
        "test": {"listed": 9, "skipped": {}, "malformed_lines": 0, "duplicate_rows": 1, "pairs_without_row": 0},
    }
    assert plan.source["malformed_line_numbers"] == [line_of(2, 6)]


def test_image_without_any_positive_attribute_is_kept(tmp_path: Path):
    """Cole et al.'s format_cub.py keeps every image of images.txt, in id order, whatever its labels: an image
    whose 312 rows all say is_present 0 stays, as an all-negative sample in its place."""
    root = make_tree(tmp_path)
    f = root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    f.write_text(labels_text(malformed=False, override={(121, a): f"121 {a} 0 4 1.0" for a in range(1, 313)}))
    plan = cub.plan(root)
    train = plan.splits["train"]
    assert [int(r.source_id) for r in train] == TRAIN_IDS  # 121 is the third training image
    assert train[2].source_id == "121" and train[2].pos == [] and train[2].meta["certainty"] == [4] * 312
    assert plan.counts["train"]["listed"] == 13 and plan.counts["train"]["skipped"] == {}


def test_strict_makes_malformed_line_fatal(tmp_path: Path):
    root = make_tree(tmp_path)
    with pytest.raises(IngestError, match=rf"image_attribute_labels\.txt:{line_of(2, 6)}: expected 5 fields .* got 6"):
        cub.plan(root, strict=True)


def test_bad_values_fatal_with_line(tmp_path: Path):
    root = make_tree(tmp_path)
    f = root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    f.write_text(labels_text(override={(121, 5): "121 5 2 3 1.0"}))
    with pytest.raises(IngestError, match=rf"labels\.txt:{line_of(121, 5)}: is_present 2 is outside 0\.\.1"):
        cub.plan(root)
    f.write_text(labels_text(override={(179, 1): "179 313 0 3 1.0"}))
    with pytest.raises(IngestError, match=rf":{line_of(179, 1)}: attribute_id 313 is outside 1\.\.312"):
        cub.plan(root)
    f.write_text(labels_text(override={(179, 1): "179 x 0 3 1.0"}))
    with pytest.raises(IngestError, match=rf":{line_of(179, 1)}: expected 5 space-separated fields"):
        cub.plan(root)


def test_blank_lines_and_extra_blanks_are_accepted(tmp_path: Path):
    root = make_tree(tmp_path)
    f = root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    # (122, 10) with a doubled and a trailing blank, then a blank line; (122, 11) with a tab
    text = labels_text(malformed=False, override={(122, 10): "122  10 1 2 5.0 \n", (122, 11): "122\t11 1 1 5.0"})
    f.write_text(text)
    plan = cub.plan(root)
    (r,) = [r for r in plan.splits["train"] if r.source_id == "122"]
    assert 9 in r.pos and 10 in r.pos
    assert r.meta["certainty"][9:11] == [2, 1]
    assert plan.source["malformed_lines"] == 0


def test_unknown_image_rows_skipped_or_fatal(tmp_path: Path):
    root = make_tree(tmp_path)
    f = root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    f.write_text(labels_text(malformed=False) + "9999 1 1 4 1.0\n\n")  # plus a trailing blank line
    plan = cub.plan(root)
    assert plan.source["rows_unknown_image"] == 1
    assert sum(len(v) for v in plan.splits.values()) == 22
    with pytest.raises(IngestError, match=r"image_attribute_labels\.txt:\d+: image_id 9999 is not in"):
        cub.plan(root, strict=True)


def test_root_may_be_the_cub_folder(tmp_path: Path):
    root = make_tree(tmp_path)
    plan = cub.plan(root / "CUB_200_2011")
    assert Path(plan.source["attributes"]).resolve() == (root / "attributes.txt").resolve()
    assert len(plan.splits["train"]) == 13


def test_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="images.txt"):
        cub.plan(tmp_path)
    root = make_tree(tmp_path)
    (root / "attributes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="attributes.txt not found"):
        cub.plan(root)


def test_wrong_field_count_in_images_txt_is_fatal(tmp_path: Path):
    root = make_tree(tmp_path)
    p = root / "CUB_200_2011" / "train_test_split.txt"
    p.write_text(p.read_text().replace("61 0", "61 2"))
    with pytest.raises(IngestError, match=r"train_test_split\.txt:3: is_training_image must be 0 or 1, got '2'"):
        cub.plan(root)


def test_image_path_that_leaves_the_image_folder_is_refused(tmp_path: Path):
    root = make_tree(tmp_path)
    p = root / "CUB_200_2011" / "images.txt"
    lines = p.read_text().splitlines()
    first_id = lines[0].split()[0]
    lines[0] = f"{first_id} ../../../secret.jpg"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(IngestError, match=r"images\.txt:1: image path '\.\./\.\./\.\./secret\.jpg' leaves the image "
                                          r"folder"):
        cub.plan(root)


def test_write_dataset_end_to_end(tmp_path: Path):
    import pyarrow.ipc as ipc

    from largeloss.shards.writer import write_dataset

    root = make_tree(tmp_path)
    plan = cub.plan(root)
    manifest = write_dataset(tmp_path / "out", plan, shard_size=5, progress=False)
    with ipc.open_file(tmp_path / "out" / "test" / "labels.arrow") as f:
        table = f.read_all()
    test_ids = [i for i in IDS if i not in TRAIN_IDS]
    assert table.column("pos").to_pylist() == [[a - 1 for a in range(1, 313) if present(i, a)] for i in test_ids]
    c = manifest.counts["train"]
    # all 22 real fixture JPEGs (grayscale 448 and 1401 included) are valid
    assert (c["listed"], c["written"], c["missing"], c["corrupt"]) == (13, 13, 0, 0)
    assert manifest.counts["test"]["duplicate_rows"] == 1 and c["malformed_lines"] == 1
    assert manifest.classes[0]["name"] == "has_bill_shape::curved_(up_or_down)"
