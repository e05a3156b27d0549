"""Exact resume under 2-process DDP (torchrun, gloo) with synchronized BatchNorm: 2N steps
straight end where N steps, a stop, a resume and N more end, bitwise on the CPU (loop.py)."""

import pytest
import torch
from engine_helpers import checkpoint_state, max_param_difference, run_train, tiny_overrides

pytestmark = pytest.mark.slow

N = 2


def assert_ok(result, what):
    assert result.returncode == 0, f"{what} failed:\n{result.stderr[-4000:]}"


def test_two_process_sync_bn_resume_equals_an_uninterrupted_run(engine_shards, tmp_path):
    common = {
        "model.backbone.norm": "sync_bn",
        "train.checkpoint_every": N,
        "train.keep_checkpoints": 0,
        "data.num_workers": 1,
        # Two micro-batches a step: DDP's no_sync on the first, BatchNorm's own all-reduces
        # on both, and the sampling seeds of each.
        "train.batch_size": 1,
        "train.grad_accum_steps": 2,
    }
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = {**common, "train.max_steps": 2 * N}
    assert_ok(run_train(2, tiny_overrides(engine_shards, straight, **full)), "straight")
    half = {**common, "train.max_steps": N}
    assert_ok(run_train(2, tiny_overrides(engine_shards, split, **half)), "first half")
    resumed = run_train(2, tiny_overrides(engine_shards, split, **full))  # resume=auto
    assert_ok(resumed, "resume")
    assert f"at step {N}" in resumed.stderr
    a, b = checkpoint_state(straight, 2 * N), checkpoint_state(split, 2 * N)
    assert a["loader"] == b["loader"]
    # The weights and the synchronized BatchNorm statistics (the same on every rank).
    assert any("running_mean" in key for key in a["model"])
    assert max_param_difference(a["model"], b["model"]) == 0.0
    assert torch.equal(
        a["model"]["backbone.body.bn1.num_batches_tracked"],
        b["model"]["backbone.body.bn1.num_batches_tracked"],
    )
    momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    restored = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum, restored, strict=True))
    assert a["scheduler"] == b["scheduler"]
