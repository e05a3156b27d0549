"""The spool: every record is on disk in the run directory before the log call returns, and
whoever opens the run directory next (a resume, a requeue) sends what was not delivered,
once, into the same MLflow run (a real ``mlflow server`` on 127.0.0.1)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]


def only_run(client: MlflowClient, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def run_script(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.slow
def test_a_requeue_sends_what_the_first_job_logged_while_the_server_was_down(
    unstarted_mlflow_server, tmp_path
):
    """The server is down for the whole first job (its run is never created); the requeued
    job creates the run with the first job's params, tags, steps and artifacts."""
    server = unstarted_mlflow_server
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=server.uri, experiment="requeue")
    note = tmp_path / "note.txt"
    note.write_text("first job")
    first = Tracker(**kwargs, start_timeout=1)
    first.log_params({"train": {"lr": 0.02, "batch": 4}})
    first.set_tags({"world_size": 2})
    for step in range(10):
        first.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    first.log_artifact(note)
    assert not first.close("KILLED", timeout=1)
    assert first.run_id is None and not (tmp_path / "run" / "run.json").exists()

    server.start()
    second = Tracker(**kwargs)
    for step in range(10, 15):
        second.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert second.close()
    client = MlflowClient(tracking_uri=server.uri)
    run = only_run(client, "requeue")
    assert run.info.run_id == second.run_id
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == second.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.02", "train.batch": "4"}
    assert run.data.tags["world_size"] == "2" and run.data.tags["stage"] == "train"
    assert steps_of(client, run.info.run_id, "loss") == list(range(15))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]


@pytest.mark.slow
def test_what_a_sigkilled_job_logged_is_sent_by_the_next_with_its_timestamps(
    unstarted_mlflow_server, tmp_path
):
    server = unstarted_mlflow_server
    run_dir = tmp_path / "run"
    script = (
        "import os, signal\n"
        "from pipeline.tracking import Tracker\n"
        f"t = Tracker(run_dir={str(run_dir)!r}, stage='train', uri={server.uri!r}, "
        "experiment='killed', start_timeout=0)\n"
        "t.log_params({'lr': 0.1})\n"
        "for step in range(20):\n"
        "    t.log_metrics({'loss': float(step)}, step=step)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed_at = int(time.time() * 1000)
    result = run_script(script)
    assert result.returncode == -9, result.stderr
    server.start()
    resumed = Tracker(run_dir=run_dir, stage="train", uri=server.uri, experiment="killed")
    assert resumed.close()
    client = MlflowClient(tracking_uri=server.uri)
    run = only_run(client, "killed")
    assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(20)]
    assert all(killed_at <= m.timestamp <= killed_at + 60_000 for m in history)


@pytest.mark.slow
def test_a_torn_last_record_is_skipped(unstarted_mlflow_server, tmp_path):
    """A SIGKILL in the middle of a write leaves a partial line at the end of the spool."""
    from pipeline.tracking.spool import SPOOL_FILE

    server = unstarted_mlflow_server
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=server.uri, experiment="torn")
    first = Tracker(**kwargs, start_timeout=0)
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    assert not first.close("KILLED", timeout=0.5)
    with open(tmp_path / "run" / SPOOL_FILE, "ab") as spool:
        spool.write(b'{"k":"metrics","s":5,"m":{"loss":')
    server.start()
    second = Tracker(**kwargs)
    second.log_metrics({"loss": 6.0}, step=6)
    assert second.close()
    client = MlflowClient(tracking_uri=server.uri)
    run = only_run(client, "torn")
    assert steps_of(client, run.info.run_id, "loss") == [0, 1, 2, 3, 4, 6]


_DIES_AFTER_A_BATCH = """
import os, signal, threading, time
from mlflow.tracking import MlflowClient
from pipeline.tracking import Tracker

# MLflow takes the first batch of metrics; the process dies before the tracker hears back.
real, taken = MlflowClient.log_batch, threading.Event()
def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
    result = real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
    if metrics:
        taken.set()
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    return result
MlflowClient.log_batch = log_batch

t = Tracker(run_dir={run_dir!r}, stage="train", uri={uri!r}, experiment="in-flight")
for step in range(5):
    t.log_metrics({{"loss": float(step), "lr": 0.1}}, step=step)
assert taken.wait(60)
for step in range(5, 10):  # logged while the first batch is on its way: never sent
    t.log_metrics({{"loss": float(step), "lr": 0.1}}, step=step)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("store", ["server", "file"])
def test_a_batch_in_flight_at_a_kill_is_not_added_twice(
    store, mlflow_server, tmp_path, monkeypatch
):
    """The SQL store behind the server ignores a point identical to one it holds (same key,
    step, timestamp and value); the file store would add it again, so the tracker checks."""
    if store == "server":
        uri = mlflow_server.uri
    else:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    run_dir = str(tmp_path / "run")
    result = run_script(_DIES_AFTER_A_BATCH.format(run_dir=run_dir, uri=uri))
    assert result.returncode == -9, result.stderr
    resumed = Tracker(run_dir=run_dir, stage="train", uri=uri, experiment="in-flight")
    assert resumed.close()
    client = MlflowClient(tracking_uri=uri)
    for key in ("loss", "lr"):
        assert steps_of(client, resumed.run_id, key) == list(range(10)), key


@pytest.mark.slow
def test_the_end_status_is_not_held_back_by_a_slow_upload(mlflow_server, tmp_path):
    """An artifact that takes longer than close_timeout to upload (a FIFO nobody writes to:
    the upload waits for ever) leaves the run FINISHED, with every metric."""
    fifo = tmp_path / "slow.bin"
    os.mkfifo(fifo)
    tracker = Tracker(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_artifact(fifo)
    start = time.monotonic()
    assert not tracker.close(timeout=5)  # the upload is still waiting
    assert time.monotonic() - start < 5 + 3
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    try:
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert steps_of(client, tracker.run_id, "loss") == [0, 1, 2]
    finally:
        # Let the abandoned upload finish (an empty file) instead of blocking for ever.
        threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True).start()


@pytest.mark.slow
def test_steps_an_earlier_attempt_logged_are_not_logged_again(mlflow_server, tmp_path):
    """A job killed at step 6 after its checkpoint at step 3: the resumed job runs steps 4-6
    again; with once=True their metrics go to the run once (the first attempt's values)."""
    kwargs = dict(run_dir=tmp_path / "run", stage="train", uri=mlflow_server.uri)
    first = Tracker(**kwargs)
    for step in range(1, 7):
        first.log_metrics({"loss": float(step)}, step=step, once=True)
    assert first.close("KILLED")
    second = Tracker(**kwargs)
    for step in range(4, 9):
        second.log_metrics({"loss": step + 0.5}, step=step, once=True)
    second.log_metrics({"system/cpu": 1.0}, step=0)  # without once=True: logged as always
    assert second.close()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    history = client.get_metric_history(first.run_id, "loss")
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5, 8.5]
    assert sorted((m.step, m.value) for m in history) == list(zip(range(1, 9), values, strict=True))
    assert steps_of(client, first.run_id, "system/cpu") == [0]


def test_eval_finds_the_run_of_a_checkpoint_saved_before_it_was_created(mlflow_server, tmp_path):
    """A checkpoint saved while the server was away names no run, but its run directory;
    the evaluation logs into the training run that run.json names by then."""
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.evaluation.tracking import open_tracker

    train = Tracker(run_dir=tmp_path / "train", stage="train", uri=mlflow_server.uri)
    assert train.flush(60) and train.run_id
    saved = {"run_id": None, "uri": mlflow_server.uri, "run_dir": str(tmp_path / "train")}
    checkpoint = SimpleNamespace(tracking=saved, path=tmp_path / "ckpt.pt", source="ours")
    cfg = load_config(None, ["tracking.enabled=true", f"tracking.uri={mlflow_server.uri}"])
    tracker, attached = open_tracker(cfg, checkpoint, tmp_path / "eval")
    assert attached and tracker.run_id == train.run_id
    assert tracker.close() and train.close()


@pytest.mark.slow
def test_the_run_is_created_soon_after_a_long_outage(unstarted_mlflow_server, tmp_path):
    """After half a minute of refused connections the retries are still close together:
    the run exists (run.json names it) within seconds of the server answering."""
    server = unstarted_mlflow_server
    tracker = Tracker(run_dir=tmp_path / "run", stage="train", uri=server.uri, start_timeout=0)
    tracker.log_metrics({"loss": 1.0}, step=1)
    time.sleep(35)
    server.start()
    answered = time.monotonic()
    while not (tmp_path / "run" / "run.json").exists():
        assert time.monotonic() - answered < 5, "no run 5 s after the server answered"
        time.sleep(0.1)
    assert tracker.close()
