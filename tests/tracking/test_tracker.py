import json
import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import Config, config_to_dict, load_config
from pipeline.tracking import Tracker, build_tracker, flatten, resolve_tracking_uri


def test_flatten_gives_dotted_string_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {
        "a.b": "1",
        "a.c.d": "[1, 2]",
        "e": "x",
    }


def test_uri_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("", tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("http://example:5000", tmp_path) == "http://example:5000"


def test_run_against_a_real_server(mlflow_server, tmp_path):
    cfg = load_config(None, ["train.lr=0.005", f"tracking.uri={mlflow_server.uri}"])
    run_dir = tmp_path / "run"
    artifact = tmp_path / "config.yaml"
    artifact.write_text("train:\n  lr: 0.005\n")
    with build_tracker(cfg, stage="train", run_dir=run_dir) as tracker:
        tracker.log_params(config_to_dict(cfg))
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.005}, step=step)
        tracker.set_tags({"world_size": 2})
        tracker.log_artifact(artifact)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005"
    assert run.data.params["model.backbone.depth"] == "50"
    assert len(run.data.params) == len(flatten(config_to_dict(cfg)))  # more than one batch
    assert run.data.tags["stage"] == "train" and run.data.tags["world_size"] == "2"
    assert run.data.tags["git_commit"]
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_a_resumed_job_continues_the_same_run(mlflow_server, tmp_path):
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    first = Tracker(**kwargs)
    first.log_metrics({"loss": 2.0}, step=0)
    first.close("KILLED")  # preempted
    second = Tracker(**kwargs)
    second.log_metrics({"loss": 1.0}, step=1)
    second.close()
    assert first.run_id == second.run_id
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1]
    assert client.get_run(first.run_id).data.tags["resumed"] == "true"
    fresh = Tracker(**kwargs, resume=False)
    assert fresh.run_id != first.run_id
    fresh.close()


def test_server_dying_mid_run_warns_once_and_goes_on(disposable_mlflow_server, tmp_path, caplog):
    mlflow_server = disposable_mlflow_server
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir=run_dir, stage="train", uri=mlflow_server.uri)
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.enabled
    mlflow_server.stop()
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    start = time.monotonic()
    for step in range(1, 20):
        tracker.log_metrics({"loss": 1.0}, step=step)
    tracker.log_artifact(run_dir / "run.json")
    tracker.close()
    assert time.monotonic() - start < 60  # one failed call, not one per step
    warnings = [r for r in caplog.records if r.name.startswith("pipeline.tracking")]
    assert len(warnings) == 1
    assert mlflow_server.uri in warnings[0].getMessage()
    assert not tracker.enabled
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == tracker.run_id


def test_unreachable_server_at_start_does_not_raise(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tracker = Tracker(run_dir=tmp_path, stage="eval", uri="http://127.0.0.1:9")
    tracker.log_params({"a": 1})
    tracker.close()
    assert tracker.run_id is None and not tracker.enabled
    assert len([r for r in caplog.records if r.name.startswith("pipeline.tracking")]) == 1


def test_default_sqlite_store_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(run_dir=tmp_path / "run", stage="shards")
    tracker.log_metrics({"images_per_s": 10.0}, step=0)
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracker.log_artifact(note)
    tracker.close()
    assert (tmp_path / "run" / "mlflow.db").exists()
    assert (tmp_path / "run" / "mlartifacts").is_dir()  # not ./mlruns of the cwd
    client = MlflowClient(tracking_uri=resolve_tracking_uri("", tmp_path / "run"))
    assert client.get_run(tracker.run_id).data.metrics["images_per_s"] == 10.0


@pytest.mark.parametrize("rank", [1, 3])
def test_only_rank_zero_tracks(tmp_path, rank):
    tracker = build_tracker(Config(), stage="train", run_dir=tmp_path / "run", rank=rank)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.close()
    assert tracker.run_id is None
    assert not (tmp_path / "run").exists()
