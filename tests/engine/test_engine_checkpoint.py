import random

import numpy as np
import pytest
import torch

from pipeline.engine.checkpoint import (
    CheckpointError,
    latest_entry,
    list_entries,
    load_file_checkpoint,
    resolve_resume,
    rng_state,
    save_file_checkpoint,
    set_rng_state,
)


def state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "step": step}


def test_save_publishes_latest_and_keeps_the_last_k(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save_file_checkpoint(ckpt, step, state(step), keep=2)
    assert [p.name for p in list_entries(ckpt)] == ["step_0000030.pt", "step_0000040.pt"]
    assert (ckpt / "latest").read_text().strip() == "step_0000040.pt"
    assert load_file_checkpoint(latest_entry(ckpt))["step"] == 40
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name]


def test_latest_falls_back_to_the_newest_entry(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        save_file_checkpoint(ckpt, step, state(step), keep=0)
    (ckpt / "latest").write_text("step_0000009.pt\n")  # names a file that is gone
    (ckpt / ".step_0000003.pt.tmp123").write_bytes(b"half a file")  # a killed save
    assert latest_entry(ckpt).name == "step_0000002.pt"


def test_resume_resolution(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume("auto", out) is None
    assert resolve_resume("never", out) is None
    save_file_checkpoint(out / "checkpoints", 5, state(5), keep=0)
    assert resolve_resume("auto", out).name == "step_0000005.pt"
    assert resolve_resume("never", out) is None
    assert resolve_resume(str(out), tmp_path).name == "step_0000005.pt"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.pt"), out)


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"step_0000001.pt cannot be read") as info:
        load_file_checkpoint(bad)
    assert "\n" not in str(info.value)
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError, match="holds no 'model'"):
        load_file_checkpoint(bad)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_file_checkpoint(tmp_path, 1, {"model": {}, "rng": saved}, keep=0)
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(load_file_checkpoint(tmp_path / "step_0000001.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
