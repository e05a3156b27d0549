import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import Config, config_to_dict, load_config
from pipeline.tracking import Tracker, build_tracker, flatten, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


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
    with build_tracker(cfg, stage="train", run_dir=run_dir, tags={"purpose": "test"}) as tracker:
        tracker.log_params(config_to_dict(cfg))
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.005}, step=step)
        tracker.set_tags({"world_size": 2})
        tracker.log_artifact(artifact)
        tracker.log_artifact(artifact, "configs")
    record = json.loads((run_dir / "run.json").read_text())
    assert record == {"run_id": tracker.run_id, "uri": mlflow_server.uri, "stage": "train"}
    run_id = record["run_id"]

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005"
    assert run.data.params["model.backbone.depth"] == "50"
    assert len(run.data.params) == len(flatten(config_to_dict(cfg)))  # more than one batch
    assert run.data.tags["stage"] == "train" and run.data.tags["world_size"] == "2"
    assert run.data.tags["git_commit"] and run.data.tags["purpose"] == "test"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml", "configs"]
    assert [a.path for a in client.list_artifacts(run_id, "configs")] == ["configs/config.yaml"]


def test_a_resumed_job_continues_the_same_run(mlflow_server, tmp_path):
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    first = Tracker(**kwargs)
    first.log_metrics({"loss": 2.0}, step=0)
    assert first.close("KILLED")  # preempted
    second = Tracker(**kwargs)
    assert second.run_id == first.run_id  # known from run.json at once
    second.log_metrics({"loss": 1.0}, step=1)
    assert second.close()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [0, 1]
    run = client.get_run(first.run_id)
    assert run.data.tags["resumed"] == "true" and run.info.status == "FINISHED"
    fresh = Tracker(**kwargs, resume=False)
    assert fresh.flush(60)
    assert fresh.run_id not in (None, first.run_id)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == fresh.run_id
    fresh.close()


def test_a_resumed_job_whose_run_was_deleted_starts_a_new_one(mlflow_server, tmp_path, caplog):
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    first = Tracker(**kwargs)
    assert first.close("KILLED")
    MlflowClient(tracking_uri=mlflow_server.uri).delete_run(first.run_id)
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    second = Tracker(**kwargs)
    second.log_metrics({"loss": 1.0}, step=1)
    assert second.close()
    assert second.run_id not in (None, first.run_id)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == second.run_id
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking")]
    assert "is gone; starting a new one" in warning


def test_eval_attaches_to_the_training_run(mlflow_server, tmp_path):
    """The eval stage logs into the (still running) training run, at the checkpoint's step,
    and leaves ending that run to training."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    train = Tracker(run_dir=tmp_path / "train", stage="train", uri=mlflow_server.uri)
    train.log_metrics({"loss": 1.0}, step=100)
    assert train.flush(60)
    cfg = load_config(None, ["tracking.uri=http://127.0.0.1:9"])  # overridden by uri=
    ev = build_tracker(
        cfg, stage="eval", run_dir=tmp_path / "eval", run_id=train.run_id,
        uri=mlflow_server.uri, tags={"evaluated_step": 100},
    )  # fmt: skip
    assert ev.run_id == train.run_id
    ev.log_metrics({"eval/bbox_mAP": 0.25}, step=100)
    ev.log_params({"eval": {"score_threshold": 0.05}})
    assert ev.close()
    assert json.loads((tmp_path / "eval" / "run.json").read_text()) == {
        "run_id": train.run_id, "uri": mlflow_server.uri, "stage": "eval",
    }  # fmt: skip
    run = client.get_run(train.run_id)
    assert run.info.status == "RUNNING"  # eval did not end the training run
    assert run.data.tags["stage"] == "train" and run.data.tags["evaluated_step"] == "100"
    assert run.data.params["eval.score_threshold"] == "0.05"
    (point,) = client.get_metric_history(train.run_id, "eval/bbox_mAP")
    assert (point.step, point.value) == (100, 0.25)
    assert train.close()
    assert client.get_run(train.run_id).info.status == "FINISHED"
    # Attached in the training directory itself: its run.json keeps "stage": "train".
    again = Tracker(run_dir=tmp_path / "train", stage="eval", uri=mlflow_server.uri,
                    run_id=train.run_id)  # fmt: skip
    assert again.close()
    assert json.loads((tmp_path / "train" / "run.json").read_text())["stage"] == "train"


def test_records_are_delivered_at_exit_without_close(mlflow_server, tmp_path):
    script = (
        "from pipeline.tracking import Tracker\n"
        f"t = Tracker(run_dir={str(tmp_path)!r}, stage='eval', uri={mlflow_server.uri!r})\n"
        "t.log_metrics({'loss': 3.0}, step=7)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    (point,) = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(run_id, "loss")
    assert (point.step, point.value) == (7, 3.0)


def test_attaching_to_a_missing_run_warns_once_and_goes_on(mlflow_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tracker = Tracker(run_dir=tmp_path, stage="eval", uri=mlflow_server.uri, run_id="0" * 32)
    assert not tracker.enabled  # the caller may fall back to a run of its own
    tracker.log_metrics({"eval/bbox_mAP": 0.1}, step=1)
    start = time.monotonic()
    assert not tracker.close(timeout=30)
    assert time.monotonic() - start < 5  # nothing to wait for: the run was refused
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking")]
    assert "refused the run" in warning and str(tmp_path) in warning


def test_a_rejected_param_is_dropped_alone(mlflow_server, tmp_path, caplog):
    """MLflow refuses to change a logged param; the other params of the batch still go."""
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    first = Tracker(**kwargs)
    first.log_params({"lr": 0.1, "batch": 2})
    assert first.close("KILLED")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    second = Tracker(**kwargs)
    second.log_params({"lr": 0.2, "batch": 2, "workers": 4})
    second.log_metrics({"loss": 1.0}, step=5)
    assert second.close()
    run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(first.run_id)
    assert run.data.params == {"lr": "0.1", "batch": "2", "workers": "4"}
    assert run.data.metrics == {"loss": 1.0}
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking")]
    assert "rejected params lr" in warning


def test_system_metrics_are_sampled_into_the_run(mlflow_server, tmp_path):
    tracker = Tracker(run_dir=tmp_path, stage="train", uri=mlflow_server.uri,
                      system_metrics=True, system_metrics_interval=0.2)  # fmt: skip
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert tracker.flush(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until a sample has arrived
        if "system/cpu_utilization_percentage" in client.get_run(tracker.run_id).data.metrics:
            break
        time.sleep(0.2)
    assert tracker.close()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


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


def test_artifacts_live_beside_a_shared_sqlite_store(tmp_path):
    """The demo's store holds every stage: the experiment's first run (the shard build, run
    from inside the dataset folder) must not decide where the training's artifacts go."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    shards = Tracker(run_dir=tmp_path / "data" / "shards", stage="shards", uri=uri)
    shards.log_metrics({"images_per_s": 1.0}, step=0)
    assert shards.close()
    train = Tracker(run_dir=tmp_path / "train", stage="train", uri=uri)
    note = tmp_path / "config.yaml"
    note.write_text("x: 1\n")
    train.log_artifact(note)
    assert train.close()
    client = MlflowClient(tracking_uri=uri)
    artifact_uri = client.get_run(train.run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri()), artifact_uri
    assert list((tmp_path / "store" / "mlartifacts").rglob("config.yaml"))
    assert not (tmp_path / "data").joinpath("shards", "mlartifacts").exists()
