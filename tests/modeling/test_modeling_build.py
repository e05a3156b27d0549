"""build_model from the configuration, checkpoints, and the torchvision converter script."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from modeling_helpers import assert_same_detections, make_torchvision_maskrcnn, smooth_images

from pipeline.config import Config, ConfigError, load_config
from pipeline.modeling import MaskRCNN, build_model, model_args_from_config

REPO = Path(__file__).resolve().parents[2]


def test_build_default_config():
    cfg = Config()  # model.num_classes=auto: the caller gives the count the data has
    model = build_model(cfg, num_classes=4)
    assert isinstance(model, MaskRCNN)
    assert model.roi_heads.num_classes == model.model_args["num_classes"] == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.backbone.body.layer4[0].conv3.out_channels == 2048  # ResNet-50
    # frozen_stages=1: the stem is frozen, res2 trains.
    assert not model.backbone.body.conv1.weight.requires_grad
    assert model.backbone.body.layer1[0].conv1.weight.requires_grad
    from_config = model_args_from_config(cfg, num_classes=4)
    assert {key: model.model_args[key] for key in from_config} == from_config


def test_num_classes_auto_needs_the_count_and_a_number_must_agree():
    with pytest.raises(ConfigError, match=r"^model.num_classes=auto: .*pass num_classes="):
        build_model(Config())
    cfg = load_config(None, ["model.num_classes=81"])
    assert model_args_from_config(cfg)["num_classes"] == 81
    assert model_args_from_config(cfg, num_classes=81)["num_classes"] == 81
    with pytest.raises(ConfigError, match=r"^model.num_classes=81 but num_classes=5 given$"):
        model_args_from_config(cfg, num_classes=5)


def test_build_small_config_runs():
    cfg = load_config(str(REPO / "configs/shapes_r18_cpu.yaml"))
    model = build_model(cfg).eval()
    assert model.backbone.out_channels == cfg.model.backbone.fpn_channels == 64
    assert len(model.backbone.body.layer1) == 2  # ResNet-18
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # frozen_stages=0
    images = smooth_images([(200, 300)])
    with torch.no_grad():
        (result,) = model(images)
    assert set(result) == {"boxes", "labels", "scores", "masks"}
    assert result["masks"].shape[1:] == (1, 200, 300)
    # No detection above the threshold: empty outputs of the right shapes.
    model.roi_heads.score_thresh = 1.0
    with torch.no_grad():
        (empty,) = model(images)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 1, 200, 300)


@pytest.mark.parametrize("frozen_stages", [0, 2, 5])
def test_frozen_stages(frozen_stages):
    cfg = load_config(str(REPO / "configs/shapes_r18_cpu.yaml"))
    cfg.model.backbone.frozen_stages = frozen_stages
    body = build_model(cfg).backbone.body
    stages = [body.conv1, body.layer1, body.layer2, body.layer3, body.layer4]
    for index, stage in enumerate(stages):
        frozen = index < frozen_stages
        assert all(p.requires_grad != frozen for p in stage.parameters()), index


def test_checkpoint_round_trip(tmp_path):
    cfg = load_config(str(REPO / "configs/shapes_r18_cpu.yaml"))
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    path = tmp_path / "model.pt"
    model.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) == {"model", "model_args", "source"}
    rebuilt = MaskRCNN.from_checkpoint(path).eval()
    assert rebuilt.model_args == model.model_args
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_build_maps_norms_and_loads_no_weights():
    cfg = load_config(str(REPO / "configs/shapes_r18_cpu.yaml"))
    assert not hasattr(cfg.model, "weights")  # init_from of the train stage loads weights
    cfg.model.backbone.norm, cfg.model.fpn_norm, cfg.model.head_norm = "gn", "gn", "gn"
    args = model_args_from_config(cfg)
    assert (args["norm"], args["fpn_norm"], args["head_norm"]) == ("gn", "gn", "gn")
    model = build_model(cfg)
    assert isinstance(model.backbone.body.bn1, torch.nn.GroupNorm)
    assert MaskRCNN.from_checkpoint(model.checkpoint()).model_args["head_norm"] == "gn"


def test_convert_torchvision_script_round_trip(tmp_path):
    reference = make_torchvision_maskrcnn(num_classes=5, seed=5)
    source, target = tmp_path / "tv.pth", tmp_path / "ours.pt"
    torch.save(reference.state_dict(), source)
    # The script's own main(), in this process (a subprocess would re-import torch).
    script = runpy.run_path(str(REPO / "launch/convert_torchvision.py"), run_name="convert")
    assert script["main"]([str(source), str(target)]) == 0
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["source"] == "torchvision"
    assert checkpoint["model_args"]["num_classes"] == 5
    assert checkpoint["model_args"]["pooler_aligned"] is False
    model = MaskRCNN.from_checkpoint(target)
    model.transform.min_size_test, model.transform.max_size_test = 256, 320
    images = smooth_images([(250, 310)], seed=5)
    with torch.no_grad():
        expected = reference(images)
        actual = model.eval()(images)
    assert_same_detections(expected[0], actual[0])
