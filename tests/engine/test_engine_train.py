"""The train stage in one process (in-process calls of ``train(cfg)``): outputs, exact resume,
the NaN guard, each norm learning, init_from and the strict resume."""

import json

import pytest
import torch
from engine_helpers import checkpoint_state, max_param_difference, tiny_config

from pipeline.engine import CheckpointError, NonFiniteLossError, train
from pipeline.modeling import MaskRCNN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def test_a_run_writes_the_documented_layout(engine_shards, tmp_path):
    out = tmp_path / "run"
    assert (
        train(
            tiny_config(engine_shards, out, **{"train.max_steps": 4, "train.checkpoint_every": 2})
        )
        == 0
    )
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "FINISHED",
        "latest",
        "step_0000002.pt",
        "step_0000004.pt",
    ]
    state = checkpoint_state(out)
    assert state["step"] == 4 and state["loader"]["epoch"] >= 0
    assert {"model", "model_args", "optimizer", "scheduler", "rng", "config"} <= state.keys()
    MaskRCNN.from_checkpoint(state)  # the eval stage rebuilds the model from it alone
    assert (out / "config.yaml").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_resume_equals_an_uninterrupted_run(engine_shards, tmp_path):
    common = {
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.keep_checkpoints": 0,
        "data.num_workers": 1,
    }
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(tiny_config(engine_shards, straight, **common)) == 0
    assert train(tiny_config(engine_shards, split, **{**common, "train.max_steps": 3})) == 0
    assert train(tiny_config(engine_shards, split, **common)) == 0  # resume=auto: 3 more
    a, b = checkpoint_state(straight, 6), checkpoint_state(split, 6)
    assert a["loader"] == b["loader"]
    momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    resumed = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    if not torch.cuda.is_available():  # bitwise on the CPU
        assert max_param_difference(a["model"], b["model"]) == 0.0
        assert all(torch.equal(x, y) for x, y in zip(momentum, resumed, strict=True))
    else:  # atomics in RoIAlign's backward and cuDNN: as close as two straight runs (loop.py)
        for key in a["model"]:
            if a["model"][key].is_floating_point():
                torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-3, atol=1e-5)
        for x, y in zip(momentum, resumed, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-5)


def test_non_finite_losses_skip_steps_then_stop_the_run(engine_shards, tmp_path, caplog):
    cfg = tiny_config(
        engine_shards,
        tmp_path / "nan",
        **{
            "train.lr": 1e9,
            "train.warmup_iters": 0,
            "train.max_steps": 50,
            "train.max_nonfinite_steps": 3,
        },
    )
    with pytest.raises(NonFiniteLossError, match="3 batches in a row had a NaN or Inf loss"):
        train(cfg)
    assert "non-finite loss" in caplog.text and "batch skipped" in caplog.text


def assert_learns(out, what):
    """Both classifiers start at chance (objectness ln 2, a 4-way softmax ln 4); together they
    must fall by a quarter. (The box and mask losses may rise for a while as the RPN starts
    to propose objects, so the total is a weak signal over a few dozen steps.)"""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def classification(record):
        return record["loss/loss_objectness"] + record["loss/loss_classifier"]

    assert classification(records[-1]) < 0.75 * classification(records[0]), (what, records)


LEARNING = {
    "train.max_steps": 24,
    "train.log_every": 4,
    "train.checkpoint_every": 100,
    "train.lr": 0.02,
    "train.lr_steps": [100],
    "train.warmup_iters": 4,
}


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_each_norm_learns_on_a_small_set(engine_shards, tmp_path, norm):
    overrides = {"model.backbone.norm": norm, **LEARNING}
    if norm == "frozen_bn":  # unnormalized from scratch: it diverged at lr 0.02 on one machine
        overrides.update({"train.lr": 0.01, "train.clip_grad_norm": 5.0})
    if norm == "gn":
        overrides.update(
            {
                "model.fpn_norm": "gn",
                "model.head_norm": "gn",
                "model.roi_heads.mask_head_channels": 32,
            }
        )
    out = tmp_path / norm
    assert train(tiny_config(engine_shards, out, **overrides)) == 0
    assert_learns(out, norm)


def test_strict_resume_refuses_another_model(engine_shards, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_config(engine_shards, out, **{"train.max_steps": 2})) == 0
    bigger = tiny_config(
        engine_shards, out, **{"train.max_steps": 4, "model.backbone.fpn_channels": 48}
    )
    with pytest.raises(CheckpointError, match="fpn"):
        train(bigger)


def test_init_from_a_checkpoint_starts_a_fresh_schedule(engine_shards, tmp_path, caplog):
    source = tmp_path / "source"
    assert train(tiny_config(engine_shards, source, **{"train.max_steps": 2})) == 0
    weights = source / "checkpoints" / "step_0000002.pt"
    caplog.set_level("INFO")
    out = tmp_path / "finetune"
    assert (
        train(tiny_config(engine_shards, out, **{"train.max_steps": 1, "train.init_from": weights}))
        == 0
    )
    assert "init_from" in caplog.text
    assert checkpoint_state(out)["step"] == 1  # step 0 + 1, not 2 + 1
    # The checkpoint says what its outputs mean, and init_from matched them by category.
    assert [c["name"] for c in checkpoint_state(out)["label_map"]] == [
        "circle", "square", "triangle",
    ]  # fmt: skip
    assert "predictor rows: kept 3 of 3 categories: 3 matched (3 by id)" in caplog.text
