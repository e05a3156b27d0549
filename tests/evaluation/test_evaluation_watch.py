"""--watch's choice of the next checkpoint and its output folders, the config an evaluation
runs with, and the command line's options (--name, --all-checkpoints)."""

import json
import subprocess
import sys

import pytest
import torch
from evaluation_helpers import (
    REPO,
    deepspeed_layout_by_hand,
    eval_config,
    tiny_model,
    training_checkpoint,
)

from pipeline.config import load_config, save_config
from pipeline.distributed import DistInfo
from pipeline.evaluation import CheckpointError, config_for, watch_training
from pipeline.evaluation.runner import checkpoint_entries, next_to_evaluate, output_name

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def write(directory, *names, latest=None, finished=False):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".pt") or name.endswith(".tmp"):
            (directory / name).write_bytes(b"")
        else:
            (directory / name).mkdir()
    if latest:
        (directory / "latest").write_text(latest + "\n")
    if finished:
        (directory / "FINISHED").touch()


def test_entries_in_step_order_without_temporary_ones(tmp_path):
    write(tmp_path, "step_0000100.pt", "step_0000020.pt", ".step_0000300.pt.tmp", "step_0000200",
          ".step_0000400.tmp", "other.pt")  # fmt: skip
    assert checkpoint_entries(tmp_path) == ["step_0000020.pt", "step_0000100.pt", "step_0000200"]
    assert checkpoint_entries(tmp_path / "missing") == []


def test_next_is_the_oldest_unevaluated_entry_up_to_latest(tmp_path):
    assert next_to_evaluate(tmp_path, set()) == (None, False)  # nothing written yet
    write(tmp_path, "step_0000010.pt", "step_0000020.pt", "step_0000030.pt",
          latest="step_0000020.pt")  # fmt: skip
    # 30 is not named by latest yet: it may still be on its way (latest is written after).
    assert next_to_evaluate(tmp_path, set()) == ("step_0000010.pt", False)
    assert next_to_evaluate(tmp_path, {"step_0000010.pt"}) == ("step_0000020.pt", False)
    assert next_to_evaluate(tmp_path, {"step_0000010.pt", "step_0000020.pt"}) == (None, False)
    (tmp_path / "latest").write_text("step_0000030.pt")
    (tmp_path / "FINISHED").touch()
    done = {"step_0000010.pt", "step_0000020.pt"}
    assert next_to_evaluate(tmp_path, done) == ("step_0000030.pt", False)  # final one first
    assert next_to_evaluate(tmp_path, done | {"step_0000030.pt"}) == (None, True)


def test_a_rotated_away_entry_is_not_waited_for(tmp_path):
    write(tmp_path, "step_0000030", latest="step_0000030", finished=True)  # 10, 20 deleted
    assert next_to_evaluate(tmp_path, {"step_0000010"}) == ("step_0000030", False)
    assert next_to_evaluate(tmp_path, {"step_0000030"}) == (None, True)


def test_output_folders_are_named_by_step_and_done_is_matched_by_step(tmp_path):
    # DIR/step_0000400.pt/ was the folder of a DDP file's evaluation.
    assert output_name("step_0000400.pt") == output_name("step_0000400") == "step_0000400"
    write(tmp_path, "step_0000010.pt", "step_0000020.pt", latest="step_0000020.pt", finished=True)
    assert next_to_evaluate(tmp_path, {"step_0000010"}) == ("step_0000020.pt", False)
    assert next_to_evaluate(tmp_path, {"step_0000010", "step_0000020"}) == (None, True)
    # The folder names of before count too: nothing is evaluated twice after the rename.
    assert next_to_evaluate(tmp_path, {"step_0000010.pt", "step_0000020"}) == (None, True)


def test_only_latest_takes_the_final_checkpoint_or_nothing(tmp_path):
    write(tmp_path, "step_0000010.pt", "step_0000020.pt", "step_0000030.pt",
          latest="step_0000030.pt", finished=True)  # fmt: skip
    assert next_to_evaluate(tmp_path, set(), only_latest=True) == ("step_0000030.pt", False)
    assert next_to_evaluate(tmp_path, {"step_0000030"}, only_latest=True) == (None, True)


@pytest.mark.slow
def test_watching_a_finished_run_evaluates_its_final_checkpoint_only(eval_shards, tmp_path, capsys):
    # It evaluated every kept checkpoint again, into DIR/step_0000010.pt/ ...
    checkpoints, out = tmp_path / "train" / "checkpoints", tmp_path / "eval"
    checkpoints.mkdir(parents=True)
    torch.save(training_checkpoint(tiny_model(), 10), checkpoints / "step_0000010.pt")
    deepspeed_layout_by_hand(checkpoints, "step_0000020", training_checkpoint(tiny_model(), 20))
    torch.save(training_checkpoint(tiny_model(), 30), checkpoints / "step_0000030.pt")
    (checkpoints / "latest").write_text("step_0000030.pt")
    (checkpoints / "FINISHED").touch()
    cfg = eval_config(eval_shards, "eval.num_pictures=0", "eval.watch_poll_s=0.1")
    reports = watch_training(cfg, tmp_path / "train", out, DistInfo())
    assert [r.metrics["step"] for r in reports] == [30]
    printed = capsys.readouterr().out
    assert "has finished: evaluating its final checkpoint only (--all-checkpoints" in printed
    assert sorted(p.name for p in out.iterdir()) == ["step_0000030"]
    # Asked for all: the others, by step (the DeepSpeed directory too), not 30 again.
    reports = watch_training(cfg, tmp_path / "train", out, DistInfo(), all_checkpoints=True)
    assert [r.metrics["step"] for r in reports] == [10, 20]
    assert sorted(p.name for p in out.iterdir()) == [f"step_00000{s}0" for s in (1, 2, 3)]
    assert watch_training(cfg, tmp_path / "train", out, DistInfo(), all_checkpoints=True) == []


def test_config_comes_from_the_file_or_the_training_run(tmp_path):
    run = tmp_path / "run"
    save_config(load_config(None, ["train.lr=0.005", "eval.batch_size=3"]), run / "config.yaml")
    write(run / "checkpoints", "step_0000010.pt", latest="step_0000010.pt")
    given = save_config(load_config(None, ["eval.batch_size=5"]), tmp_path / "given.yaml")
    assert config_for(str(given), [], str(run), None).eval.batch_size == 5
    for checkpoint in (run, run / "checkpoints", run / "checkpoints" / "step_0000010.pt"):
        cfg = config_for(None, ["eval.num_pictures=0"], str(checkpoint), None)
        assert (cfg.train.lr, cfg.eval.batch_size, cfg.eval.num_pictures) == (0.005, 3, 0)
    assert config_for(None, [], None, str(run)).train.lr == 0.005
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no --config given"):
        config_for(None, [], str(tmp_path / "elsewhere.pt"), None)


def test_a_checkpoint_path_that_does_not_exist_is_named_before_the_config(tmp_path):
    # A typo used to be reported as a missing training config.yaml "at or above" the path.
    run = tmp_path / "demo" / "train"
    save_config(load_config(), run / "config.yaml")
    typo = tmp_path / "demo" / "trian"
    expected = f"^checkpoint {typo}: no such file or directory \\(did you mean {run}\\?\\)$"
    with pytest.raises(CheckpointError, match=expected):
        config_for(None, [], str(typo), None)
    with pytest.raises(CheckpointError, match=f"^checkpoint {typo}: no such file or directory"):
        config_for(str(run / "config.yaml"), [], str(typo), None)
    with pytest.raises(CheckpointError, match=f"^--watch {typo}: no such directory"):
        config_for(None, [], None, str(typo))
    with pytest.raises(CheckpointError, match=r"no such file or directory$"):
        config_for(None, [], str(tmp_path / "nothing" / "like" / "it"), None)


@pytest.mark.slow  # Python processes that import torch: seconds
def test_the_command_line_names_the_dataset(eval_shards, checkpoint_file, tmp_path):
    config = save_config(eval_config(eval_shards, "eval.num_pictures=0"), tmp_path / "eval.yaml")
    command = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--config", str(config),
               "--checkpoint", str(checkpoint_file), "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run([*command, "--name", "my val"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --name 'my val' is used as 'my_val' (metric-key safe)" in result.stdout
    assert "my_val: evaluated 11 of 11 images (0 failed)" in result.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["dataset"] == "my_val"
    for extra, message in (
        (["--name", "/"], "--name '/': no letter or digit in it"),
        (["--all-checkpoints"], "--all-checkpoints goes with --watch"),
    ):
        refused = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1].endswith(f"error: {message}")
