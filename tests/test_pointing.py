"""eval.pointing: CAMs, the argmax point and its mapping to the original image, hit / miss per class, the
run-directory CLI (train/pointing.py) (full models and heads on a frozen backbone), overlays, and the
report's Table 4."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from largeloss.eval import tables
from largeloss.eval.pointing import PointingError, Tally, argmax_points, class_activation_maps, inside_any, to_original
from largeloss.eval.rundir import find_runs
from largeloss.shards.format import UNLISTED_NEGATIVE, IngestPlan, Record
from largeloss.shards.writer import write_dataset
from largeloss.train import pointing

K = 3
W, H, S = 64, 48, 64  # original width, height; the network input is S x S (squashed)
# boxes of every image: class 0 around the red square, class 1 in the top-left corner, class 2 bottom-left
BOXES = {0: [36.0, 2.0, 60.0, 34.0], 1: [0.0, 0.0, 30.0, 20.0], 2: [0.0, 30.0, 30.0, 48.0]}


def test_cam_is_the_head_applied_at_every_position():
    # D = 2 channels on a 1 x 2 grid: F[:, 0, 0] = (1, 2), F[:, 0, 1] = (3, -1); W = [[1, 0], [2, 1]]
    feats = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])
    cams = class_activation_maps(feats, torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    # class 0: (1, 3); class 1: (2*1 + 2, 2*3 - 1) = (4, 5)
    assert cams.tolist() == [[[[1.0, 3.0]], [[4.0, 5.0]]]]
    with pytest.raises(ValueError, match=r"\[B, D, h, w\] and \[K, D\]"):
        class_activation_maps(feats, torch.ones(2, 3))


def test_argmax_point_upsampled_and_grid():
    cam = torch.tensor([[[0.0, 1.0], [5.0, 2.0]]])  # maximum in row 1, column 0
    # grid: the cell's centre in the 4 x 4 input: ((0 + 0.5) * 4/2, (1 + 0.5) * 4/2) = (1, 3)
    assert argmax_points(cam, 4, "grid").tolist() == [[1.0, 3.0]]
    # upsampled bilinearly to 4 x 4 (align_corners=False): output pixel (3, 0) samples source (1.25, -0.25),
    # clamped to cell (1, 0) = 5 exactly; pixel (2, 0) samples row 0.75 -> 0.25 * 0 + 0.75 * 5 < 5. Centre (0.5, 3.5)
    assert argmax_points(cam, 4, "upsample").tolist() == [[0.5, 3.5]]
    # ties go to the first position in row-major order
    assert argmax_points(torch.zeros(2, 3, 3), 6, "grid").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert argmax_points(torch.zeros(1, 3, 3), 6, "upsample").tolist() == [[0.5, 0.5]]
    # to the original image (squash resize): x * W / S, y * H / S
    assert to_original(np.array([[0.5, 3.5]]), 4, 8, 2).tolist() == [[1.0, 1.75]]
    assert inside_any(10, 20, [[0, 0, 5, 5], [10, 10, 30, 20]])  # edges count
    assert not inside_any(9.99, 20, [[10, 10, 30, 20]])


def test_tally_mean_over_classes_with_boxes():
    t = Tally(3)
    for hit in (True, True, False):
        t.add(0, hit)
    t.add(2, False)
    res = t.result(["a", "b", "c"])
    # class 0: 2 / 3, class 2: 0 / 1, class 1 has no box: excluded -> (2/3 + 0) / 2
    assert res["pointing_accuracy"] == pytest.approx(1 / 3)
    assert res["excluded_classes"] == [1] and (res["hits"], res["misses"]) == (2, 2)
    assert res["per_class"][0] == {"class": 0, "name": "a", "hits": 2, "misses": 1, "accuracy": 2 / 3}


# ------------------------------------------------------------------------------------ run directories


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 test images 64 x 48, black, a red square x in [40, 56), y in [6, 30); every class has a box."""
    root = tmp_path_factory.mktemp("pt") / "data"
    recs = []
    for i in range(3):
        img = np.zeros((H, W, 3), np.uint8)
        img[6:30, 40:56] = (0, 0, 255)  # BGR red
        img[40 + i, 5] = (30, 30, 30)  # images differ a little
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        assert ok
        boxes = [{"class": c, "bbox": b} for c, b in BOXES.items()]
        recs.append(Record(source_id=str(i), rel_path=f"{i}.jpg", pos=[0, 1, 2], data=jpg.tobytes(),
                           meta={"boxes": boxes}))
    plan = IngestPlan(dataset="redsq", classes=[{"index": c, "id": f"c{c}", "name": f"c{c}"} for c in range(K)],
                      splits={"train": recs[:1], "test": recs}, unlisted=UNLISTED_NEGATIVE)
    write_dataset(root, plan, shard_size=2, progress=False)
    return root


def make_run(root, name, data, arch, weights, state, method="an", seed=0):
    from safetensors.torch import save_file

    d = root / name
    (d / "checkpoints" / "best").mkdir(parents=True)
    cfg = {"data": str(data), "dataset": "redsq", "method": method, "seed": seed, "arch": arch, "weights": weights,
           "image_size": S}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "checkpoints" / "best" / "model.safetensors"))
    return d


class RedNet(torch.nn.Module):
    """A stand-in model: its 'feature map' is the redness (R - G) pooled over 8 x 8 cells: an 8 x 8 grid."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, K)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [0.0], [1.0]]))  # class 1: a flat CAM

    def features(self, images):
        red = images[:, 0:1].float() - images[:, 1:2].float()
        return torch.nn.functional.avg_pool2d(red, 8)


def test_hits_through_the_whole_path(data, tmp_path, monkeypatch):
    # In the 64 x 64 input the red square covers x 40..56 and y 8..40 (6..30 scaled by 64/48): cells
    # (rows 1-4, cols 5-6) of the 8 x 8 map. Class 0 and 2 (weight +1) peak there; mapped back to the
    # original the point lies in x 40..56, y 6..30: inside class 0's box (hit), not class 2's (miss).
    # Class 1's CAM is flat: the first pixel, (0.5, 0.5) -> (0.5, 0.375) in the original, in its box (hit).
    run = make_run(tmp_path, "full", data, "small_cnn", "none", {"backbone.w": torch.zeros(1), **RedNet().state_dict()})
    monkeypatch.setattr(pointing, "_build", lambda r, k, dev: RedNet().eval())
    res = pointing.pointing_game([run], overlays=2)[str(run)]
    assert [(c["hits"], c["misses"]) for c in res["per_class"]] == [(3, 0), (3, 0), (0, 3)]
    assert res["pointing_accuracy"] == pytest.approx(2 / 3)
    assert res["images_evaluated"] == 3 and res["excluded_classes"] == []
    assert json.loads((run / "pointing.json").read_text()) == res
    pngs = sorted(p.name for p in (run / "pointing").iterdir())
    assert pngs == ["000000.png", "000001.png"]
    panel = cv2.imread(str(run / "pointing" / pngs[0]))
    assert panel.shape == (S, 3 * S, 3)  # one S x S panel per class with a box
    # grid mode, same verdicts here
    grid = pointing.pointing_game([run], mode="grid", write=False)[str(run)]
    assert [(c["hits"], c["misses"]) for c in grid["per_class"]] == [(3, 0), (3, 0), (0, 3)]


def test_real_models_and_shared_backbone(data, tmp_path, monkeypatch, capsys):
    from largeloss.train.model import build_model

    # (1) Two heads trained on cached features over EfficientNet-Lite0 at 64 px: its last map is 2 x 2. (2) A
    # full small_cnn whose head is zero: a flat CAM, hence the first pixel (0.5, 0.5) -> (0.5, 0.375) in the
    # original: in class 1's box only -> per class 0 / 1 / 0.
    torch.manual_seed(0)
    heads = [{"head.weight": torch.randn(K, 1280), "head.bias": torch.zeros(K)} for _ in range(2)]
    h0 = make_run(tmp_path, "h0", data, "efficientnet_lite0", "IMAGENET", heads[0], seed=0)
    h1 = make_run(tmp_path, "h1", data, "efficientnet_lite0", "IMAGENET", heads[1], seed=1)
    full = build_model("small_cnn", K, "none")
    with torch.no_grad():
        full.head.weight.zero_()
    f0 = make_run(tmp_path, "f0", data, "small_cnn", "none", full.state_dict(), method="ll_ct")
    builds = []
    real_build = pointing._build
    monkeypatch.setattr(pointing, "_build", lambda r, k, dev: builds.append(r.path.name) or real_build(r, k, dev))
    assert pointing.main([str(tmp_path)]) == 0
    assert sorted(builds) == ["f0", "h0"]  # h1 shares h0's backbone pass
    res = {p.name: json.loads((p / "pointing.json").read_text()) for p in (h0, h1, f0)}
    assert [(c["hits"], c["misses"]) for c in res["f0"]["per_class"]] == [(0, 3), (3, 0), (0, 3)]
    assert res["f0"]["pointing_accuracy"] == pytest.approx(1 / 3) and res["f0"]["head_only"] is False
    # each head's verdicts are its own CAM's: recompute them from the backbone's map directly
    model = build_model("efficientnet_lite0", K, "IMAGENET").eval()
    from largeloss.shards.jpeg import decode_image
    from largeloss.shards.reader import open_dataset

    imgs = torch.from_numpy(np.stack([decode_image(s.jpeg, S).transpose(2, 0, 1)
                                      for s in open_dataset(data).iter_samples("test")]))
    with torch.no_grad():
        fmap = model.features(imgs)
    assert fmap.shape[2:] == (2, 2)
    for name, head in (("h0", heads[0]), ("h1", heads[1])):
        cams = torch.einsum("bdhw,kd->bkhw", fmap, head["head.weight"])
        hits = np.zeros(K, int)
        for b in range(3):
            for c in range(K):
                up = torch.nn.functional.interpolate(cams[b, c][None, None], size=(S, S), mode="bilinear")[0, 0]
                r, col = divmod(int(np.argmax(up.numpy())), S)
                x, y = (col + 0.5) * W / S, (r + 0.5) * H / S
                hits[c] += inside_any(x, y, [BOXES[c]])
        assert [c["hits"] for c in res[name]["per_class"]] == hits.tolist()
        assert res[name]["head_only"] is True
    out = capsys.readouterr().out
    assert "pointing game 33.3 %" in out
    # the report's Table 4 (runs need result.json to be found as runs: config.yaml suffices)
    table = tables.pointing_table(find_runs([tmp_path]))
    assert table.header == ["Method", "redsq"]
    an = [row for row in table.rows if row[0] == "Naive AN"][0]
    mean = 100 * (res["h0"]["pointing_accuracy"] + res["h1"]["pointing_accuracy"]) / 2
    assert an[1].startswith(f"{mean:.1f} ± ")
    assert [row for row in table.rows if row[0] == "LL-Ct"][0] == ["LL-Ct", "33.3"]


def test_errors(data, tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"data": str(data), "arch": "small_cnn", "weights": "none",
                                                   "image_size": 32, "dataset": "x", "method": "an", "seed": 0}))
    with pytest.raises(PointingError, match="no saved best weights"):
        pointing.pointing_game([d])
    assert pointing.main([str(tmp_path / "missing")]) == 1
