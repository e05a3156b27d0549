"""Preemption under ``srun``, one Slurm task per process, with a slow checkpoint write.

train.sbatch with LAUNCHER=srun runs ``srun --kill-on-bad-exit=1 --ntasks-per-node=2
python launch/train.py``. Only rank 0 writes the checkpoint; when rank 1 exits (75) before
it is published, srun cancels the step: SIGTERM to every task's process group, which kills
rank 0's data-loading workers (and with them rank 0), SIGKILL after KillWait. The
requeued job would then start from the previous checkpoint. The torchrun side is in
tests/engine/test_engine_preemption.py.
"""

import json
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))  # one wrapper for both launchers' tests
from engine_helpers import slow_checkpoint_python  # noqa: E402

pytestmark = pytest.mark.slow

# Rank 1 exits about a second after the step: a write this slow is cut on the old code.
SLOW_WRITE_S = 8


def wait_until(predicate, timeout: float, what: str, logs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


def metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def test_srun_tasks_wait_for_a_slow_preemption_checkpoint(
    slurm_cluster, shapes_root, shapes_shards, tmp_path
):
    out, log = tmp_path / "out", tmp_path / "train.out"
    python = slow_checkpoint_python(tmp_path / "bin", SLOW_WRITE_S)
    args = [
        "--config", str(REPO / "configs" / "tiny.yaml"), f"data.root={shapes_root}",
        f"data.train_shards={shapes_shards['train']}", f"data.val_shards={shapes_shards['val']}",
        f"train.output_dir={out}", "train.max_steps=8", "train.checkpoint_every=100",
        "tracking.enabled=false",
    ]  # fmt: skip
    env = {**slurm_cluster.env, "LAUNCHER": "srun", "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2",
           "PYTHON": str(python), "REPO_DIR": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip
    job_id = slurm_cluster.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
         f"--chdir={REPO}", str(REPO / "slurm" / "train.sbatch"), *args],
        env=env,
    ).stdout.strip()  # fmt: skip

    def read_log():
        return log.read_text(errors="replace")[-5000:] if log.exists() else "(no log yet)"

    def training():
        state = slurm_cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING"):
            pytest.fail(f"job {job_id} ended {state} before the signal\n{read_log()}")
        return bool(metric_steps(out))

    wait_until(training, 240, "the first training step", read_log)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])

    # Slurm holds a requeued job for 120 s (BeginTime). Before releasing it, look at what
    # the preempted run left: the checkpoint of its last step, published.
    left: dict = {}

    def requeued():
        job = slurm_cluster.job(job_id)
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            latest = out / "checkpoints" / "latest"
            left.update(step=metric_steps(out)[-1], latest=latest.exists() and latest.read_text())
            slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            return True
        if job.get("JobState") not in ("RUNNING", "COMPLETING", "PENDING"):
            pytest.fail(f"job {job_id} ended {job.get('JobState')} instead of requeueing\n"
                        f"{read_log()}")  # fmt: skip
        return False

    wait_until(requeued, 240, "the requeue", read_log)
    text = log.read_text(errors="replace")
    assert f"sleeps {SLOW_WRITE_S} s before writing" in text, text[-5000:]
    assert "srun on 1 node(s) x 2 process(es)" in text and "torch.distributed.run" not in text
    stopped_at = left["step"]
    assert left["latest"], (
        f"no checkpoint after the preemption at step {stopped_at} (rank 0 was killed while "
        f"writing it):\n{text[-5000:]}"
    )
    name = f"step_{stopped_at:07d}.pt"
    assert left["latest"].strip() == name
    # srun reports the tasks that exited together as one range ("tasks 0-1") or one by one
    # ("task 1"), depending on how close their exits were: either way rank 1 exited with 75
    # rather than being killed.
    assert re.search(r"tasks? (0-)?1: Exited with exit code 75", text), text[-5000:]

    # the requeued job resumes from that step and finishes
    states = slurm_cluster.wait_finished([job_id], timeout=300)
    text = log.read_text(errors="replace")
    assert states[job_id] == ["COMPLETED"], text[-5000:]
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    assert re.search(rf"resumed from \S+/{name} at step {stopped_at}\b", text), text[-5000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000008.pt"
