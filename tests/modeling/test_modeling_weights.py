"""Initialising from our checkpoints, converted torchvision Mask R-CNNs and ImageNet ResNets,
and the strict load of a resumed run."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch
import torchvision
from modeling_helpers import tiny_config

from pipeline.modeling import MaskRCNN, build_model, load_init_weights, load_strict_state

REPO = Path(__file__).resolve().parents[2]
PREDICTOR_KEYS = {
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_head.logits.weight",
    "roi_heads.mask_head.logits.bias",
}


def tiny_model(seed: int, **overrides) -> MaskRCNN:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides))


def assert_state_equal(model, other, keys):
    own, theirs = model.state_dict(), other.state_dict()
    for key in keys:
        assert torch.equal(own[key], theirs[key]), key


@pytest.mark.parametrize("wrapped", [False, True])
def test_our_checkpoint(tmp_path, wrapped):
    source = tiny_model(1)
    checkpoint = source.checkpoint()
    if wrapped:  # saved from a DDP wrapper
        checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "ours.pt")
    target = tiny_model(2)
    report = load_init_weights(target, tmp_path / "ours.pt")
    assert report.kind == "Mask R-CNN checkpoint"
    assert report.new == [] and report.skipped == {}
    assert set(report.loaded) == set(source.state_dict())
    assert_state_equal(target, source, source.state_dict())
    lines = report.summary_lines()
    assert len(lines) == 3
    assert lines[0] == f"loaded {len(report.loaded)} tensors (Mask R-CNN checkpoint)"
    assert lines[1].startswith("new 0") and lines[2] == "skipped 0"


def test_our_checkpoint_into_another_class_count(tmp_path):
    source = tiny_model(1)
    source.save_checkpoint(tmp_path / "ours.pt")
    target = tiny_model(2, num_classes=7)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_init_weights(target, tmp_path / "ours.pt")
    assert set(report.new) == PREDICTOR_KEYS == set(report.skipped)
    assert report.skipped["roi_heads.box_predictor.cls_score.weight"] == (
        "shape [4, 64] vs model [7, 64]"
    )
    assert report.differing_args["num_classes"] == (4, 7)
    for key in PREDICTOR_KEYS:  # left at their fresh initialisation
        assert torch.equal(target.state_dict()[key], fresh[key]), key
    assert_state_equal(target, source, report.loaded)
    assert "skipped 6: roi_heads." in report.summary_lines()[2]


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    """A torchvision maskrcnn_resnet50_fpn state dict (91 classes) and its conversion."""
    directory = tmp_path_factory.mktemp("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    raw, converted = directory / "tv.pth", directory / "converted.pt"
    torch.save(reference.state_dict(), raw)
    script = runpy.run_path(str(REPO / "launch/convert_torchvision.py"), run_name="convert")
    assert script["main"]([str(raw), str(converted)]) == 0
    return raw, converted


@pytest.mark.parametrize("which", ["converted", "raw"])
def test_torchvision_mask_rcnn_into_another_class_count(torchvision_files, which):
    raw, converted = torchvision_files
    path = converted if which == "converted" else raw
    model = MaskRCNN(num_classes=4)  # ResNet-50 FPN, 256 channels, our aligned pooling
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_init_weights(model, path)
    assert report.kind == (
        "Mask R-CNN checkpoint" if which == "converted" else "torchvision Mask R-CNN"
    )
    assert set(report.new) == PREDICTOR_KEYS
    skipped_names = {
        MaskRCNN.convert_torchvision_key(k) if which == "raw" else k
        for k, reason in report.skipped.items()
        if reason != "BatchNorm bookkeeping"  # the raw file's num_batches_tracked
    }
    assert skipped_names == PREDICTOR_KEYS
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    assert report.skipped[cls_key] == "shape [91, 1024] vs model [4, 1024]"
    expected = MaskRCNN.from_checkpoint(converted).state_dict()
    for key, value in model.state_dict().items():
        source = fresh if key in PREDICTOR_KEYS else expected
        assert torch.equal(value, source[key]), key
    if which == "converted":
        assert report.differing_args["pooler_aligned"] == (False, True)


def imagenet_resnet18(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # statistics that differ from the defaults, to see where they go
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
    torch.save(resnet.state_dict(), path)
    return resnet.eval()


def resnet_features(resnet, x):
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


@pytest.mark.parametrize(
    ("norm", "frozen_stages"), [("frozen_bn", 1), ("bn", 0), ("bn", 2), ("gn", 0)]
)
def test_imagenet_resnet_into_the_backbone(tmp_path, norm, frozen_stages):
    resnet = imagenet_resnet18(tmp_path / "resnet18.pth")
    model = tiny_model(3, **{"backbone.norm": norm, "backbone.frozen_stages": frozen_stages})
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_init_weights(model, tmp_path / "resnet18.pth")
    assert report.kind == "ImageNet ResNet"
    assert all(key.startswith("backbone.body.") for key in report.loaded)
    assert report.skipped["fc.weight"] == report.skipped["fc.bias"]
    assert "classifier" in report.skipped["fc.weight"]
    reference = resnet.state_dict()
    own = model.state_dict()
    key = "layer3.1.conv2.weight"
    assert torch.equal(own[f"backbone.body.{key}"], reference[key])
    assert any(key.startswith("backbone.fpn.") for key in report.new)
    assert not any(k.startswith("backbone.fpn.") or k.startswith("rpn.") for k in report.loaded)
    if norm == "gn":
        assert report.skipped["layer1.0.bn1.running_mean"] == "model uses GroupNorm"
        assert report.skipped["layer1.0.bn1.weight"] == "model uses GroupNorm"
        assert torch.equal(
            own["backbone.body.layer1.0.bn1.weight"], fresh["backbone.body.layer1.0.bn1.weight"]
        )
        assert "backbone.body.layer1.0.bn1.weight" in report.new
        return
    # BatchNorm statistics went into the (frozen or trainable) BatchNorm buffers.
    for key in ("bn1.running_var", "layer1.0.bn1.running_mean", "layer4.1.bn2.weight"):
        assert torch.equal(own[f"backbone.body.{key}"], reference[key]), key
    if norm == "frozen_bn":
        assert report.skipped["bn1.num_batches_tracked"] == "FrozenBatchNorm keeps no batch count"
    body_new = [key for key in report.new if key.startswith("backbone.body.")]
    assert body_new == []
    # The same features as torchvision's ResNet (BatchNorm in eval mode).
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone.body(x)[-1], resnet_features(resnet, x), rtol=1e-4, atol=1e-4
        )


def test_not_a_state_dict(tmp_path):
    model = tiny_model(0)
    cases = {
        "list.pt": [1, 2, 3],
        "strings.pt": {"model": {"a": "b"}},
        "empty.pt": {},
        "unrelated.pt": {"encoder.weight": torch.zeros(2)},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(name)):
            load_init_weights(model, tmp_path / name)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"text\.pt"):
        load_init_weights(model, tmp_path / "text.pt")


def test_load_strict_state(tmp_path):
    source, target = tiny_model(1), tiny_model(2)
    state = source.state_dict()
    load_strict_state(target, {f"module.{k}": v for k, v in state.items()}, "ckpt.pt")
    assert_state_equal(target, source, state)
    missing = dict(state)
    del missing["rpn.head.conv.weight"]
    with pytest.raises(RuntimeError, match=r"ckpt\.pt.*missing rpn\.head\.conv\.weight \(model \["):
        load_strict_state(target, missing, "ckpt.pt")
    other = tiny_model(3, num_classes=6).state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"step_1\.pt.*cls_score\.weight: checkpoint \[6, 64\] vs model \[4, 64\]",
    ):
        load_strict_state(target, other, "step_1.pt")
    extra = {**state, "rpn.head.extra": torch.zeros(3)}
    with pytest.raises(RuntimeError, match=r"unexpected rpn\.head\.extra \(checkpoint \[3\]\)"):
        load_strict_state(target, extra, "ckpt.pt")
