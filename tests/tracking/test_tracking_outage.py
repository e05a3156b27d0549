"""Tracking across MLflow outages: nothing lost, training never waits, one message each way."""

import json
import logging
import statistics
import time
import tracemalloc

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker


def tracking_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking")]


def count(messages: list[str], text: str) -> int:
    return sum(text in m for m in messages)


def timed_log(tracker: Tracker, step: int, durations: list[float]):
    start = time.perf_counter()
    tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.01}, step=step)
    durations.append(time.perf_counter() - start)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_server_unreachable_for_the_whole_run(unreachable_uri, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir=run_dir, stage="eval", uri=unreachable_uri)
    durations: list[float] = []
    for step in range(200):
        timed_log(tracker, step, durations)
    tracker.log_params({"a": 1})
    tracker.log_artifact(tmp_path)
    start = time.monotonic()
    assert not tracker.close(timeout=3)
    assert time.monotonic() - start < 3 + 2
    assert max(durations) < 0.1
    assert tracker.run_id is None and not (run_dir / "run.json").exists()
    messages = tracking_messages(caplog)
    assert count(messages, "is unreachable") == 1, messages
    (gave_up,) = [m for m in messages if "gave up" in m]
    assert str(run_dir) in gave_up and "400 metric points" in gave_up
    assert "run was never created" in gave_up
    assert len(messages) == 2, messages
    tracker.log_metrics({"loss": 0.0}, step=999)  # after close: a no-op, no error


def test_what_is_logged_while_away_waits_on_disk_not_in_memory(unreachable_uri, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tracker = Tracker(run_dir=tmp_path, stage="train", uri=unreachable_uri, start_timeout=1)
    ours = [tracemalloc.Filter(True, "*/pipeline/tracking/*")]  # not MLflow's retries
    tracemalloc.start()
    before = tracemalloc.take_snapshot().filter_traces(ours)
    for step in range(20_000):
        tracker.log_metrics({"loss": float(step)}, step=step)
    time.sleep(2)  # the sender has read the spool by now (a block of it at a time)
    after = tracemalloc.take_snapshot().filter_traces(ours)
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 100_000, grown  # 20 000 points queued in memory take about 2 MB
    assert not tracker.close(timeout=1)
    (gave_up,) = [m for m in tracking_messages(caplog) if "gave up" in m]
    assert "20000 metric points" in gave_up and "dropped" not in gave_up


@pytest.mark.slow
def test_metrics_survive_a_server_outage(disposable_mlflow_server, tmp_path, caplog, monkeypatch):
    """The server hangs, then dies, then comes back on the same store and port: every step
    arrives, log_metrics never waits on it, and the outage is reported once each way."""
    server = disposable_mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # a hung request fails after 2 s
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    tracker = Tracker(run_dir=tmp_path / "run", stage="train", uri=server.uri, close_timeout=120)
    assert tracker.flush(60) and tracker.run_id
    durations: list[float] = []
    for step in range(10):
        timed_log(tracker, step, durations)
    server.freeze()  # requests are accepted and never answered: the sender blocks
    for step in range(10, 30):
        timed_log(tracker, step, durations)
        time.sleep(0.05)
    wait_for(lambda: count(tracking_messages(caplog), "is unreachable"), 60, "the outage warning")
    server.kill()  # now connections are refused
    for step in range(30, 50):
        timed_log(tracker, step, durations)
        time.sleep(0.02)
    tracker.set_tags({"outage": "survived"})
    server.start()
    for step in range(50, 60):
        timed_log(tracker, step, durations)
    assert tracker.close()

    # A blocking call would take at least the 2 s request timeout while the server hangs.
    assert max(durations) < 0.25 and statistics.median(durations) < 0.005, durations
    client = MlflowClient(tracking_uri=server.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(60))
    assert all(m.value == pytest.approx(1.0 / (m.step + 1)) for m in history)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["outage"] == "survived"
    messages = tracking_messages(caplog)
    assert count(messages, "is unreachable") == 1, messages
    assert count(messages, "is back after") == 1, messages
    assert not [m for m in messages if "gave up" in m or "rejected" in m]


@pytest.mark.slow
def test_run_is_created_once_the_server_comes_up(unstarted_mlflow_server, tmp_path, caplog):
    server = unstarted_mlflow_server
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir=run_dir, stage="train", uri=server.uri, close_timeout=120)
    tracker.log_params({"train": {"lr": 0.02}})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.run_id is None and not (run_dir / "run.json").exists()
    server.start()
    assert tracker.flush(120)
    record = json.loads((run_dir / "run.json").read_text())
    assert record == {"run_id": tracker.run_id, "uri": server.uri, "stage": "train"}
    tracker.log_metrics({"loss": 5.0}, step=5)
    assert tracker.close()
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.02"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(6))
    messages = tracking_messages(caplog)
    assert count(messages, "is unreachable") == 1 and count(messages, "is back after") == 1
