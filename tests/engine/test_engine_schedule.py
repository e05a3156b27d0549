"""The schedule keeps its meaning in images on any number of processes (``train.
scale_schedule``), and a resume on another number continues on the new batch's schedule."""

import json

import pytest
import torch
from engine_helpers import REPO, checkpoint_state, run_train, tiny_overrides
from torch import nn

from pipeline.config import load_config
from pipeline.engine.optim import (
    build_optimization,
    build_schedule,
    effective_schedule,
    place_schedule,
)

COCO_1X = REPO / "configs" / "coco_r50_fpn_1x.yaml"


def test_coco_1x_keeps_its_epochs_on_any_number_of_gpus():
    cfg = load_config(COCO_1X)  # 2 images per GPU, meant for 16 a step
    on = {gpus: build_schedule(cfg, gpus) for gpus in (8, 16, 64)}
    assert on[8].max_steps == 90000 and on[8].lr == pytest.approx(0.02)
    assert on[8].milestones == (60000, 80000) and on[8].warmup_iters == 1000
    assert (on[16].max_steps, on[16].milestones, on[16].warmup_iters) == (45000, (30e3, 40e3), 500)
    assert on[16].lr == pytest.approx(0.04) and on[16].checkpoint_every == 2500
    assert (on[64].max_steps, on[64].milestones, on[64].warmup_iters) == (11250, (7500, 1e4), 125)
    assert on[64].lr == pytest.approx(0.16) and on[64].checkpoint_every == 625
    for schedule in on.values():  # the same images, the same lr per image
        assert schedule.max_steps * schedule.global_batch == 90000 * 16
        assert schedule.lr / schedule.global_batch == pytest.approx(0.02 / 16)


def test_the_scaling_can_be_turned_off():
    cfg = load_config(COCO_1X, ["train.scale_schedule=false"])
    schedule = build_schedule(cfg, 64)
    assert (schedule.max_steps, schedule.milestones, schedule.warmup_iters) == (
        90000,
        (60000, 80000),
        1000,
    )
    assert schedule.lr == pytest.approx(0.16)  # the lr still follows the batch


def test_a_positive_step_count_stays_positive():
    schedule = effective_schedule(
        lr=0.01, max_steps=3, warmup_iters=0, milestones=[], checkpoint_every=1,
        global_batch=64, reference_batch_size=2, scale_steps=True,
    )  # fmt: skip
    assert (schedule.max_steps, schedule.checkpoint_every, schedule.warmup_iters) == (1, 1, 0)


def test_place_schedule_replaces_the_saved_rates():
    cfg = load_config(COCO_1X)
    model = nn.Linear(2, 2)
    saved_opt, saved_sched = build_optimization(cfg, model, build_schedule(cfg, 64))
    for _ in range(3):
        saved_opt.step()
        saved_sched.step()
    schedule = build_schedule(cfg, 8)
    optimizer, scheduler = build_optimization(cfg, model, schedule)
    optimizer.load_state_dict(saved_opt.state_dict())
    scheduler.load_state_dict(saved_sched.state_dict())
    assert optimizer.param_groups[0]["lr"] != pytest.approx(0.02 * 0.001 + 0.02 * 24 / 1000)
    place_schedule(scheduler, lr=schedule.lr, step=24)
    warm = 0.001 * (1 - 24 / 1000) + 24 / 1000
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.02 * warm) and group["initial_lr"] == 0.02
    assert scheduler.get_last_lr() == [pytest.approx(0.02 * warm)] * 2
    optimizer.step()
    scheduler.step()  # the next step follows the new schedule
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (0.001 * (1 - 0.025) + 0.025))


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lr_by_image(records: list[dict], global_batch: int) -> dict[int, float]:
    """Image position -> the lr per image of the step that starts there. A record of step s
    holds the lr after s steps, that is of the step starting at image s x B."""
    return {r["step"] * global_batch: r["lr"] / global_batch for r in records}


SCALED = {
    "train.scale_schedule": "true",
    "train.max_steps": 8,
    "train.lr_steps": "[4]",
    "train.warmup_iters": 2,
    "train.checkpoint_every": 4,
    "train.keep_checkpoints": 0,
    "data.epoch_samples": 1000,
    "data.num_workers": 0,
}


@pytest.mark.slow
def test_one_and_two_processes_see_the_same_images_at_the_same_lr(engine_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = run_train(0, tiny_overrides(engine_shards, one, **SCALED))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train(2, tiny_overrides(engine_shards, two, **SCALED))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 steps of 4 images at lr 0.02" in result.stderr
    # 8 steps of 2 images against 4 steps of 4: the same 16 images
    assert checkpoint_state(one)["loader"]["samples_consumed"] == 16
    assert checkpoint_state(two)["loader"]["samples_consumed"] == 16
    assert [r["step"] for r in logged(two)] == [1, 2, 3, 4]
    a, b = lr_by_image(logged(one), 2), lr_by_image(logged(two), 4)
    assert set(b) <= set(a)
    for position in b:
        assert b[position] == pytest.approx(a[position]), position


@pytest.mark.slow
def test_resume_on_fewer_processes_takes_the_new_batch_schedule(engine_shards, tmp_path):
    out = tmp_path / "run"
    first = run_train(2, tiny_overrides(engine_shards, out, **{**SCALED, "train.max_steps": 4}))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = checkpoint_state(out)
    assert (saved["step"], saved["global_batch"], saved["images_seen"]) == (2, 4, 8)
    assert saved["scheduler"]["base_lrs"] == [pytest.approx(0.02)] * 2
    resumed = run_train(0, tiny_overrides(engine_shards, out, **SCALED))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continues at step 4 (8 images seen)" in resumed.stderr
    final = checkpoint_state(out)
    # One process, 2 images a step: 8 images seen are step 4 of its 8, and it makes 4 more.
    assert (final["step"], final["images_seen"]) == (8, 16)
    assert final["loader"]["samples_consumed"] == 16
    assert final["scheduler"]["base_lrs"] == [pytest.approx(0.01)] * 2
    records = logged(out)
    assert [r["step"] for r in records] == [1, 2, 5, 6, 7, 8]
    # After the resume, the lr of the 1-process schedule: 0.01, cut tenfold at step 4.
    assert [r["lr"] for r in records[2:]] == [pytest.approx(0.001)] * 4
    assert torch.isfinite(torch.tensor([r["loss/total"] for r in records])).all()
