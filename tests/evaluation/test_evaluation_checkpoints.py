"""Which checkpoints evaluate (ours, DeepSpeed's, torchvision's converted) and the one-line
errors for the others."""

import importlib.util
import json
import os
import re
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch
import torchvision
from evaluation_helpers import (
    REPO,
    TINY_MODEL,
    deepspeed_layout_by_hand,
    eval_config,
    first_shard_only,
    one_line,
    publish_checkpoint,
    real_deepspeed_checkpoint,
    tiny_model,
    training_checkpoint,
)
from torch.serialization import get_unsafe_globals_in_checkpoint

from pipeline.distributed import DistInfo
from pipeline.evaluation import CheckpointError, evaluate_checkpoint, load_checkpoint
from pipeline.evaluation.checkpoints import resolve_checkpoint
from pipeline.evaluation.runner import load_model_everywhere
from pipeline.modeling import MaskRCNN

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def test_the_forms_of_a_checkpoint_path(tmp_path, checkpoint_file):
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    run = tmp_path / "run"
    publish_checkpoint(run, 10, checkpoint)
    latest = publish_checkpoint(run, 20, checkpoint)
    assert resolve_checkpoint(checkpoint_file) == checkpoint_file
    assert resolve_checkpoint(run) == latest  # a training output_dir: its latest entry
    assert resolve_checkpoint(run / "checkpoints") == latest
    ds = deepspeed_layout_by_hand(tmp_path / "ds" / "checkpoints", "step_0000030", checkpoint)
    assert resolve_checkpoint(ds) == ds
    assert resolve_checkpoint(tmp_path / "ds") == ds
    loaded = load_checkpoint(tmp_path / "ds")
    assert (loaded.step, loaded.source, loaded.name) == (40, "deepspeed", "step_0000030")
    assert loaded.state.keys() == checkpoint["model"].keys()


def test_missing_and_incompatible_checkpoints_fail_in_one_line(tmp_path, checkpoint_file):
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in one_line(error) and "no such file" in one_line(error)

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000500.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(run)
    assert "step_0000500.pt" in one_line(error)

    garbage = tmp_path / "garbage.pt"
    for junk in (b"not a checkpoint", bytes(range(256)) * 64):
        garbage.write_bytes(junk)
        with pytest.raises(CheckpointError, match=r"not a file written by torch\.save") as error:
            load_checkpoint(garbage)
        # The exception's type names what went wrong (not a bare number), and nothing
        # advises weights_only=False.
        assert re.search(r"\(\w+(Error|Exception)\b", one_line(error)), one_line(error)
        assert "weights_only" not in one_line(error)

    cfg = eval_config(tmp_path / "unused")
    info = DistInfo()
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    wrong_classes = tmp_path / "wrong_classes.pt"
    torch.save({**checkpoint, "model_args": {**checkpoint["model_args"], "num_classes": 91}},
               wrong_classes)  # fmt: skip
    damaged = tmp_path / "damaged.pt"
    state = dict(checkpoint["model"])
    state.pop("roi_heads.box_predictor.cls_score.bias")
    state["rpn.head.conv.weight"] = state["rpn.head.conv.weight"][:1]
    torch.save({**checkpoint, "model": state}, damaged)
    manifest = SimpleNamespace(num_classes=4, root="shards")  # 3 categories + background
    cases = [
        (wrong_classes, "shape (6): roi_heads.box_predictor.cls_score.weight (4, 64) vs (91, 64)"),
        (damaged, "missing (1): roi_heads.box_predictor.cls_score.bias"),
        (damaged, "shape (1): rpn.head.conv.weight (1, 32, 3, 3) vs (32, 32, 3, 3)"),
    ]
    for path, expected in cases:
        with pytest.raises(CheckpointError) as error:
            load_model_everywhere(cfg, path, info, manifest)
        assert expected in one_line(error) and str(path) in one_line(error)


def test_deepspeed_checkpoint_by_hand_evaluates(eval_shards, tmp_path, checkpoint_file):
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    model_dir = tmp_path / "train" / "checkpoints"
    deepspeed_layout_by_hand(model_dir, "step_0000040", checkpoint)
    cfg = eval_config(eval_shards)
    ours = evaluate_checkpoint(cfg, checkpoint_file, tmp_path / "ours", DistInfo())
    deepspeed = evaluate_checkpoint(cfg, tmp_path / "train", tmp_path / "ds", DistInfo())
    assert deepspeed.metrics["step"] == 40 and deepspeed.metrics["images_evaluated"] == 11
    for key in ("bbox/AP", "bbox/AR100", "segm/AP", "segm/AR100"):
        assert deepspeed.metrics[key] == ours.metrics[key]
    assert json.loads((tmp_path / "ds" / "bbox.json").read_text()) == json.loads(
        (tmp_path / "ours" / "bbox.json").read_text()
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_checkpoint_saved_by_deepspeed_evaluates(eval_shards, tmp_path, checkpoint_file):
    entry = real_deepspeed_checkpoint(checkpoint_file, tmp_path / "checkpoints", free_port())
    # DeepSpeed 0.19 stores nothing in its model states that needs an allow-list: they load
    # with weights_only=True as they are (a DeepSpeed that adds a type shows up here).
    assert get_unsafe_globals_in_checkpoint(entry / "mp_rank_00_model_states.pt") == []
    loaded = load_checkpoint(tmp_path / "checkpoints")
    assert loaded.path == entry and loaded.source == "deepspeed" and loaded.step == 40
    reference = torch.load(checkpoint_file, weights_only=True)["model"]
    assert all(torch.equal(loaded.state[k], v) for k, v in reference.items())
    report = evaluate_checkpoint(eval_config(eval_shards), entry, tmp_path / "out", DistInfo())
    assert report.metrics["images_evaluated"] == 11


class CreatesAFile:
    """Unpickled, it creates ``path``: what a malicious file could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_deepspeed_file_whose_unpickling_runs_code_is_refused(
    eval_shards, tmp_path, checkpoint_file, capsys
):
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    entry = tmp_path / "train" / "checkpoints" / "step_0000040"
    entry.mkdir(parents=True)
    marker = tmp_path / "marker"
    state = {"module": checkpoint["model"], "model_args": checkpoint["model_args"], "step": 40}
    torch.save({**state, "payload": CreatesAFile(marker)}, entry / "mp_rank_00_model_states.pt")
    # The file does what it says when unpickled without restriction (on a copy).
    shutil.copy(entry / "mp_rank_00_model_states.pt", tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(entry)
    assert str(entry / "mp_rank_00_model_states.pt") in one_line(error)
    assert not marker.exists()

    spec = importlib.util.spec_from_file_location("evaluate", REPO / "launch/evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    capsys.readouterr()
    code = evaluate.main(
        ["--checkpoint", str(entry), "--out", str(tmp_path / "out"), "--config",
         str(REPO / "configs" / "tiny.yaml"), f"data.val_shards={eval_shards}",
         "tracking.enabled=false", "data.num_workers=0"]
    )  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "mp_rank_00_model_states.pt" in errors[0]
    assert not marker.exists() and not os.path.exists(tmp_path / "out" / "metrics.json")


@pytest.mark.slow  # R50 with 100 random detections per image: seconds per image on a CPU
def test_converted_torchvision_checkpoint_evaluates(eval_shards, tmp_path):
    torch.manual_seed(0)
    torchvision_model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4
    )
    raw = tmp_path / "torchvision.pth"
    torch.save(torchvision_model.state_dict(), raw)
    spec = importlib.util.spec_from_file_location("convert", REPO / "launch/convert_torchvision.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    converted = tmp_path / "converted.pt"
    convert.convert(raw, converted)
    shards = first_shard_only(eval_shards, tmp_path / "shards")
    cfg = eval_config(shards, "eval.num_pictures=0")
    report = evaluate_checkpoint(cfg, converted, tmp_path / "out", DistInfo())
    assert report.metrics["images_evaluated"] == 3 and report.metrics["step"] is None
    assert len(json.loads((tmp_path / "out" / "segm.json").read_text())) == 300
    assert load_checkpoint(converted).source == "torchvision"
    # The raw torchvision state dict is recognised and converted on the fly.
    raw_loaded = load_checkpoint(raw)
    assert raw_loaded.source == "torchvision" and raw_loaded.model_args["pooler_aligned"] is False
    expected = MaskRCNN.from_torchvision(torchvision_model.state_dict()).state_dict()
    assert raw_loaded.state.keys() == expected.keys()


def test_ddp_prefixed_state_loads(tmp_path):
    checkpoint = training_checkpoint(tiny_model(), 5)
    checkpoint["model"] = {f"module.{k}": v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "ddp.pt")
    loaded = load_checkpoint(tmp_path / "ddp.pt")
    assert loaded.model_args == MaskRCNN(**TINY_MODEL).model_args
    assert not any(k.startswith("module.") for k in loaded.state)
