"""A training run logged to a real ``mlflow server`` on 127.0.0.1, which is stopped mid-run
and started again on the same store: training never stops, nothing is lost."""

import json
import time

import pytest
from engine_helpers import run_train, start_train, tiny_overrides, train_command

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def logged_steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def test_a_run_survives_the_server_going_away(engine_shards, tmp_path, disposable_mlflow_server):
    from mlflow.tracking import MlflowClient

    server = disposable_mlflow_server
    out = tmp_path / "tracked"
    steps = 40
    overrides = tiny_overrides(
        engine_shards,
        out,
        **{
            "tracking.enabled": "true",
            "tracking.uri": server.uri,
            "tracking.experiment": "engine",
            "train.max_steps": steps,
            "train.checkpoint_every": 20,
            "train.log_every": 1,
        },
    )
    process = start_train(train_command(0, overrides))
    deadline = time.monotonic() + 180
    while len(logged_steps(out)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    server.stop()
    down_at = logged_steps(out)[-1]
    while len(logged_steps(out)) < down_at + 5 and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None or process.returncode == 0  # training went on without it
    server.start()
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    assert logged_steps(out)[-1] == steps

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(steps)
    assert run.data.params["model.backbone.depth"] == "18"
    assert {"world_size", "num_nodes", "strategy", "hosts", "git_commit"} <= run.data.tags.keys()
    assert run.data.tags["world_size"] == "1" and run.data.tags["stage"] == "train"
    history = client.get_metric_history(run_id, "loss/total")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    for name in ("lr", "images_per_s", "data_wait_share", "loss/loss_mask"):
        assert len(client.get_metric_history(run_id, name)) == steps, name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "loss_curve.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
        f"checkpoints/step_{steps:07d}.pt"
    ]
    # the server went away once and came back once: one warning each, not one per call
    assert output.count(" is unreachable (") == 1 and output.count(" is back after ") == 1


def test_a_resumed_run_continues_the_same_mlflow_run(engine_shards, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "resumed"
    common = {
        "tracking.enabled": "true",
        "tracking.uri": mlflow_server.uri,
        "train.checkpoint_every": 2,
    }
    for steps in (2, 4):
        result = run_train(
            0, tiny_overrides(engine_shards, out, **common, **{"train.max_steps": steps})
        )
        assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "train"
    history = MlflowClient(mlflow_server.uri).get_metric_history(record["run_id"], "loss/total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
