"""Training against a real ``mlflow server`` on 127.0.0.1 that is down when training starts,
or while the trainer is SIGKILLed, or a run that raises: in the end one MLflow run holds every
param, tag and artifact and each logged step's metrics exactly once, with the right status."""

import json
import signal
import sys
import time

import pytest
from engine_helpers import (
    REPO,
    checkpoint_state,
    run_train,
    start_train,
    tiny_overrides,
    train_command,
    train_env,
)

from pipeline.config import config_to_dict, load_config
from pipeline.tracking import flatten

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for_step(process, out, step: int, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not logged_steps(out) or logged_steps(out)[-1] < step:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"training did not reach step {step}"
        time.sleep(0.05)


KEEP_ALL = {"train.keep_checkpoints": 0}


def overrides(shards, out, server, steps: int, **extra) -> list[str]:
    return tiny_overrides(
        shards,
        out,
        **{
            "tracking.enabled": "true",
            "tracking.uri": server.uri,
            "tracking.experiment": "durability",
            "tracking.system_metrics": "false",
            "train.max_steps": steps,
            "train.checkpoint_every": 10,
            "train.log_every": 1,
            **extra,
        },
    )


def assert_one_complete_run(server, out, steps: int, status: str = "FINISHED") -> str:
    """The experiment's only run: the config's params, the run's tags, every step of every
    metric of metrics.jsonl once, the end artifacts; run.json and the last checkpoint name it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("durability")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == status
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    cfg = load_config(out / "config.yaml")
    assert run.data.params == flatten(config_to_dict(cfg))
    assert {"world_size", "num_nodes", "strategy", "hosts", "git_commit"} <= run.data.tags.keys()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    for key in set(lines[0]) - {"step"}:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
    if status == "FINISHED":
        assert {a.path for a in client.list_artifacts(run_id)} >= {
            "config.yaml", "loss_curve.png", "checkpoints"
        }  # fmt: skip
        assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == [
            f"checkpoints/step_{steps:07d}.pt"
        ]
        assert checkpoint_state(out)["tracking"]["run_id"] == run_id
    return run_id


def test_the_server_comes_up_in_the_middle_of_training(
    engine_shards, tmp_path, unstarted_mlflow_server
):
    server, out, steps = unstarted_mlflow_server, tmp_path / "late", 60
    command = train_command(0, overrides(engine_shards, out, server, steps, **KEEP_ALL))
    process = start_train(command)
    wait_for_step(process, out, 5)
    # The trainer waits while the server starts: a server takes longer to start than this
    # tiny training takes to finish.
    process.send_signal(signal.SIGSTOP)
    try:
        server.start()
    finally:
        process.send_signal(signal.SIGCONT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    run_id = assert_one_complete_run(server, out, steps)
    # The checkpoints name the run from the first one saved after MLflow created it.
    named = [checkpoint_state(out, step)["tracking"]["run_id"] for step in range(10, 61, 10)]
    assert named[-1] == run_id and named == sorted(named, key=lambda name: name is not None)
    assert set(named) <= {None, run_id}


@pytest.mark.parametrize("up_at_start", [False, True], ids=["down-at-start", "down-later"])
def test_a_trainer_sigkilled_while_the_server_is_down_resumes_into_one_run(
    engine_shards, tmp_path, unstarted_mlflow_server, up_at_start
):
    """Killed at step 14 (checkpoint at 10): the resumed job runs 11-14 again."""
    server, out, steps = unstarted_mlflow_server, tmp_path / "killed", 30
    if up_at_start:
        server.start()
    process = start_train(train_command(0, overrides(engine_shards, out, server, steps)))
    if up_at_start:
        wait_for_step(process, out, 3)
        server.kill()
    wait_for_step(process, out, 14)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    saved = checkpoint_state(out, 10)["tracking"]["run_id"]
    assert (saved is not None) == up_at_start
    server.start()
    result = run_train(0, overrides(engine_shards, out, server, steps), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = assert_one_complete_run(server, out, steps)
    assert saved in (None, run_id)


_FAILS_AT_STEP_3 = """
import runpy, sys
import pipeline.engine.loop as loop

real = loop.append_metrics
def append_metrics(out, step, metrics):
    if step == 3:
        raise RuntimeError("injected failure at step 3")
    return real(out, step, metrics)
loop.append_metrics = append_metrics
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_that_raises_ends_failed(engine_shards, tmp_path, mlflow_server):
    import subprocess

    from mlflow.tracking import MlflowClient

    out = tmp_path / "fails"
    script = tmp_path / "fails_at_step_3.py"
    script.write_text(_FAILS_AT_STEP_3)
    command = train_command(0, overrides(engine_shards, out, mlflow_server, 10))
    assert command[0] == sys.executable
    result = subprocess.run([sys.executable, str(script), *command[1:]], capture_output=True,
                            text=True, timeout=300, env=train_env(), cwd=REPO)  # fmt: skip
    assert result.returncode == 1 and "injected failure at step 3" in result.stderr
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == [1, 2]
