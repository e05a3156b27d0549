"""--watch's choice of the next checkpoint, and the config an evaluation runs with."""

import pytest

from pipeline.config import load_config, save_config
from pipeline.evaluation import CheckpointError, config_for
from pipeline.evaluation.runner import checkpoint_entries, next_to_evaluate


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
