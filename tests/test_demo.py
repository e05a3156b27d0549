"""`make demo` end to end with the tiny config: generate, shards, 2-process training,
2-process evaluation, all logged into one MLflow store."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_runs_the_whole_pipeline(tmp_path):
    from mlflow.tracking import MlflowClient

    out, data = tmp_path / "demo", tmp_path / "shapes"
    command = [
        "make", "--no-print-directory", "demo", f"DEMO_OUT={out}", f"DEMO_DATA={data}",
        "DEMO_CONFIG=configs/tiny.yaml", "DEMO_TRAIN_IMAGES=16", "DEMO_VAL_IMAGES=6",
        "DEMO_OVERRIDES=train.max_steps=3 train.checkpoint_every=3",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=env)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (out / "train" / "config.yaml").exists() and (out / "train" / "run.json").exists()
    assert (out / "train" / "checkpoints" / "FINISHED").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0.0, key
    assert metrics["images_evaluated"] == 6 and metrics["images_failed"] == 0
    assert "segm" in result.stdout and "Pictures:" in result.stdout and "mlflow ui" in result.stdout

    run_id = json.loads((out / "train" / "run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["stage"] == "train" and run.data.tags["world_size"] == "2"
    # the evaluation went into the training run, keyed by the val shards' name
    assert metrics["dataset"] == "shapes_val" and "shapes_val/segm/AP" in run.data.metrics
    assert "shapes_val/segm/AP, ..." in result.stdout  # the demo says where to look


def test_make_clean_also_forgets_the_install(tmp_path):
    # Removing ops/*.so but keeping the stamp made the next `make` rebuild nothing, and the
    # ops fell back to the slow reference. Run on a copy: clean here would hit the checkout.
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "_C.so").touch()
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()
    result = subprocess.run(["make", "--no-print-directory", "clean"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ops" / "_C.so").exists()
    assert not (tmp_path / ".venv" / ".installed").exists()
    assert (tmp_path / ".venv").is_dir()  # the environment itself is kept
