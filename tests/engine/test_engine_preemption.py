"""Preemption of a two-process DDP run whose checkpoint write is slow, under torchrun.

Only rank 0 writes the checkpoint. If the other ranks exited (75) before it was published,
torchrun's agent would see a failed worker and stop rank 0 while it writes: SIGTERM to its
process group, which the preemption handler swallows in rank 0 itself but which kills its
data-loading workers, so that the DataLoader raises in rank 0 at once ("DataLoader worker
... is killed by signal: Terminated"); SIGKILL follows 30 s later in any case. The
requeued job would then resume from the previous checkpoint. The Slurm side (``srun
--kill-on-bad-exit``) is in tests/slurm/test_slurm_preemption.py.
"""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
from engine_helpers import (
    REPO,
    checkpoint_state,
    run_train,
    slow_checkpoint_python,
    start_train,
    tiny_overrides,
    train_command,
)

pytestmark = pytest.mark.slow

# Rank 1 exits about a second after the step (it has nothing to write), and the agent
# checks its workers every 0.1 s: a write this slow is cut on the old code every time.
SLOW_WRITE_S = 8


def metric_steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_torchrun_workers_wait_for_a_slow_preemption_checkpoint(engine_shards, tmp_path):
    out = tmp_path / "run"
    python = slow_checkpoint_python(tmp_path / "bin", SLOW_WRITE_S)
    overrides = tiny_overrides(
        engine_shards, out, **{"train.max_steps": 200, "train.checkpoint_every": 1000}
    )
    command = train_command(2, overrides)
    script = command.index(str(REPO / "launch" / "train.py"))
    command.insert(script, str(python))  # torchrun runs: python -u WRAPPER launch/train.py ...
    agent = start_train(command, start_new_session=True)
    workers: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not metric_steps(out):
            assert time.monotonic() < deadline and agent.poll() is None, "training did not start"
            time.sleep(0.2)
        workers = subprocess.run(
            ["pgrep", "-P", str(agent.pid), "-f", "launch/train.py"], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2, f"expected 2 workers of torchrun, found {workers}"
        # The signal reaches the workers, not the agent (as when a cluster signals every
        # training process): the agent is still watching them when rank 1 exits.
        for pid in workers:
            os.kill(int(pid), signal.SIGTERM)
        output = agent.communicate(timeout=SLOW_WRITE_S + 120)[0]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            for pid in workers:  # torchrun starts each worker in a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    assert f"sleeps {SLOW_WRITE_S} s before writing" in output, output[-4000:]
    stopped_at = metric_steps(out)[-1]  # the preemption's step is the last one logged
    latest = out / "checkpoints" / "latest"
    assert latest.exists(), (
        f"no checkpoint after the preemption at step {stopped_at} (rank 0 was killed while "
        f"writing it):\n{output[-4000:]}"
    )
    assert latest.read_text().strip() == f"step_{stopped_at:07d}.pt"
    assert checkpoint_state(out)["step"] == stopped_at  # complete: it loads
    assert "exitcode: 75" in output and "SIGKILL" not in output, output[-4000:]

    # the requeued job: the same two processes resume from that step
    resumed = run_train(
        2,
        tiny_overrides(
            engine_shards,
            out,
            **{"train.max_steps": stopped_at + 1, "train.checkpoint_every": 1000},
        ),
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"step_{stopped_at:07d}.pt at step {stopped_at} " in log, log[-3000:]
    assert checkpoint_state(out)["step"] == stopped_at + 1
