"""The run directory's checkpoint contract is one, below both stages: the train stage that
writes it and the evaluation stage that reads it agree on its error and on what a ``latest``
pointer that names a missing entry means."""

import pytest
import torch

import pipeline.engine
import pipeline.evaluation
from pipeline.engine.checkpoint import latest_entry, resolve_resume
from pipeline.evaluation.checkpoints import resolve_checkpoint


def test_both_stages_raise_one_checkpoint_error():
    assert pipeline.engine.CheckpointError is pipeline.evaluation.CheckpointError


def entry(ckpt, step):
    path = ckpt / f"step_{step:07d}.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "step": step}, path)
    return path


def test_a_dangling_latest_means_the_same_to_both_stages(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    entry(ckpt, 1)
    newest = entry(ckpt, 2)
    (ckpt / "latest").write_text("step_0000009.pt\n")  # its entry was removed by hand
    # Every entry on disk is complete (each is renamed into place whole): the newest one.
    assert latest_entry(ckpt) == newest
    assert resolve_resume("auto", out) == newest
    assert resolve_checkpoint(out) == newest
    assert resolve_checkpoint(ckpt) == newest

    for path in ckpt.glob("step_*"):
        path.unlink()
    # A run whose checkpoints are all gone is not one to start over or to evaluate nothing of.
    for stage in (lambda: resolve_resume("auto", out), lambda: resolve_checkpoint(out)):
        with pytest.raises(pipeline.engine.CheckpointError) as error:
            stage()
        message = str(error.value)
        assert "\n" not in message
        assert str(ckpt / "latest") in message and "step_0000009.pt" in message
