import json
import logging
import os
import random
from pathlib import Path

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
from pipeline.engine.progress import METRICS_FILE, append_metrics, truncate_metrics


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
    with pytest.raises(CheckpointError, match=r"missing\.pt: no such file or directory"):
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


# --- durability and the leftovers of a crash -------------------------------------------------


def record_syncs_and_renames(monkeypatch, directory: Path) -> list[str]:
    """Every fsync (by the path its descriptor is open on, ``DIR`` for ``directory``, a
    temporary name without its pid) and every rename (by its target), in order."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append("fsync " + ("DIR" if path == directory else path.name.rstrip("0123456789")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(f"rename {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_the_directory_is_synced_after_each_rename_and_latest_before_it(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    events = record_syncs_and_renames(monkeypatch, ckpt)
    save_file_checkpoint(ckpt, 5, state(5), keep=0)
    # A power cut after any of these leaves either the previous checkpoint or this one:
    # without the directory's fsync, `latest` could reach the disk before the entry's name.
    assert events == [
        "fsync .step_0000005.pt.tmp",
        "rename step_0000005.pt",
        "fsync DIR",
        "fsync .latest.tmp",
        "rename latest",
        "fsync DIR",
    ]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    lines = [json.dumps({"step": step, "loss/total": 1.0 / step}) for step in (1, 2, 3)]
    # A crash in the middle of append_metrics: the last line has no end.
    (tmp_path / METRICS_FILE).write_text("".join(f"{line}\n" for line in lines) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        truncate_metrics(tmp_path, 3)
    assert (tmp_path / METRICS_FILE).read_text() == "".join(f"{line}\n" for line in lines)
    assert METRICS_FILE in caplog.text and "torn" in caplog.text
    append_metrics(tmp_path, 4, {"loss/total": 0.25})  # the resumed run goes on cleanly
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
