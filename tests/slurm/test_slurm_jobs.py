"""The Slurm job scripts on a real (local, one-node, CPU-only) Slurm cluster.

1. slurm/pipeline.sh submits the shard arrays and merges, training and evaluation; with
   LAUNCHER=srun the two training processes are two Slurm tasks (no torchrun) that form one
   job of world size 2.
2. train.sbatch under torchrun gets SIGUSR1 in the middle of training: it checkpoints, is
   requeued, resumes from that checkpoint and finishes in the same MLflow run; a job chained
   after it with afterok waits through the requeue.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def tiny_overrides(data_root: Path, train_shards: Path, val_shards: Path, out: Path) -> list:
    return [
        "--config", str(REPO / "configs" / "tiny.yaml"),
        f"data.root={data_root}", f"data.train_shards={train_shards}",
        f"data.val_shards={val_shards}", f"train.output_dir={out}",
    ]  # fmt: skip


def job_env(cluster, **extra) -> dict:
    """The jobs run on the CPU (gloo), from this checkout, with this interpreter."""
    env = {**cluster.env, "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
           "REPO_DIR": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}  # fmt: skip
    env.update(extra)
    return env


def logs_of(directory: Path, tail: int = 0) -> str:
    """The job logs in ``directory``, each cut to its last ``tail`` characters (0: whole)."""
    parts = [f"--- {p.name}:\n{p.read_text(errors='replace')[-tail:]}"
             for p in sorted(directory.glob("*.out"))]  # fmt: skip
    return "\n".join(parts)


def mlflow_runs(uri: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(ids)


def test_pipeline_shards_train_eval(slurm_cluster, shapes_root, tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    args = tiny_overrides(shapes_root, shards / "train", shards / "val", out)
    env = job_env(slurm_cluster, LAUNCHER="srun", SHARD_JOBS="2", VAL_SHARD_JOBS="1",
                  SHARD_SIZE="4", SHARD_CPUS="1")  # fmt: skip
    submitted = subprocess.run(
        [str(REPO / "slurm" / "pipeline.sh"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    jobs = dict(re.findall(r"^  (\S+) (\d+)$", submitted.stdout, flags=re.M))
    assert list(jobs) == ["shards-train", "merge-train", "shards-val", "train", "eval"]
    assert "mlflow: experiment 'maskrcnn', run 'out-" in submitted.stdout

    states = slurm_cluster.wait_finished(jobs.values(), timeout=900)
    logs, text = logs_of(out / "slurm", tail=3000), logs_of(out / "slurm")
    for name, job_id in jobs.items():
        assert states[job_id] and set(states[job_id]) == {"COMPLETED"}, (name, states, logs)
    assert len(states[jobs["shards-train"]]) == 2  # the array's two tasks

    # the shards with their manifests, the checkpoint, the metrics
    for split, count in (("train", 16), ("val", 8)):
        index = json.loads((shards / split / "index.json").read_text())
        assert index["total_samples"] == count
    assert (out / "checkpoints" / "FINISHED").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000006.pt"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics, logs

    # MLflow: the two shard runs and the training run, which holds the evaluation too
    _, runs = mlflow_runs(f"sqlite:///{out}/mlflow.db")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    assert sorted(r.info.run_name for r in by_stage["shards"]) == ["shards-train", "shards-val"]
    (train,) = by_stage["train"]
    assert train.info.run_id == json.loads((out / "run.json").read_text())["run_id"]
    assert train.info.status == "FINISHED"
    # two srun tasks, no torchrun, trained as ONE job of world size 2
    assert train.data.tags["world_size"] == "2", logs
    assert "srun on 1 node(s) x 2 process(es)" in text
    assert "training ddp on 2 process(es)" in text
    assert "torch.distributed.run" not in text
    name = json.loads((shards / "val" / "index.json").read_text())["name"]
    assert name == f"{shapes_root.name}_val" and f"{name}/segm/AP" in train.data.metrics


def wait_until(predicate, timeout: float, what: str, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, shapes_root, shapes_shards, tmp_path):
    out, log = tmp_path / "out", tmp_path / "train.out"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = tiny_overrides(shapes_root, shapes_shards["train"], shapes_shards["val"], out)
    args += ["train.max_steps=10", "train.checkpoint_every=100"]
    env = job_env(slurm_cluster, LAUNCHER="torchrun", MLFLOW_TRACKING_URI=uri)
    job_id = slurm_cluster.run(
        ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}", f"--chdir={REPO}",
         str(REPO / "slurm" / "train.sbatch"), *args],
        env=env,
    ).stdout.strip()  # fmt: skip
    # a stage chained after training (as pipeline.sh chains the evaluation) waits through the
    # requeue instead of seeing it as a failure
    after_id = slurm_cluster.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes",
         f"--output={tmp_path}/after.out", "--wrap", "echo after training"],
    ).stdout.strip()  # fmt: skip

    def read_log():
        return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log yet)"

    def training_steps():
        state = slurm_cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING"):
            pytest.fail(f"job {job_id} ended {state} before the signal\n{read_log()}")
        metrics = out / "metrics.jsonl"  # a step is done,
        # and the MLflow run is open (the tracker opens it in the background)
        return metrics.exists() and metrics.read_text().strip() and (out / "run.json").exists()

    wait_until(training_steps, 300, "the first training step and the MLflow run", read_log)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])

    # Slurm holds a requeued job for 120 s (BeginTime); let it start at once.
    def requeued():
        job = slurm_cluster.job(job_id)
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            return True
        if job.get("JobState") not in ("RUNNING", "COMPLETING", "PENDING"):
            pytest.fail(f"job {job_id} ended {job.get('JobState')} instead of requeueing\n"
                        f"{read_log()}")  # fmt: skip
        return False

    wait_until(requeued, 300, "the requeue", read_log)
    states = slurm_cluster.wait_finished([job_id, after_id], timeout=600)
    text = log.read_text(errors="replace")
    assert states[job_id] == ["COMPLETED"], text[-4000:]
    assert states[after_id] == ["COMPLETED"]
    assert slurm_cluster.job(job_id)["Restarts"] == "1"

    # the first run checkpointed at step k after the signal; the second resumed from there
    assert "batch shell got SIGUSR1" in text and "requeueing (restart 1)" in text
    saved = re.findall(r"checkpoint: \S+/(step_(\d+)\.pt)", text)
    assert saved, text[-4000:]
    preempt_name, preempt_step = saved[0][0], int(saved[0][1])
    assert 1 <= preempt_step < 10
    assert re.search(rf"resumed from \S+{preempt_name} at step {preempt_step}\b", text), text
    assert "job " + job_id + " (restart 1)" in text and "train.resume=auto" in text
    assert (out / "checkpoints" / "FINISHED").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000010.pt"

    # one MLflow run for both parts, finished, with the loss of every step
    client, runs = mlflow_runs(uri)
    train_runs = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert [r.info.run_id for r in train_runs] == [run_id]
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    assert train_runs[0].info.status == "FINISHED"
    assert train_runs[0].data.tags.get("resumed") == "true"
    steps = {m.step for m in client.get_metric_history(run_id, "loss/total")}
    assert steps == set(range(1, 11)), sorted(steps)
