"""Each stage's launch script logs its run to a real MLflow server."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.data.shapes import make_shapes_dataset

REPO = Path(__file__).resolve().parents[2]


def test_shard_stage_is_tracked(mlflow_server, tmp_path):
    make_shapes_dataset(tmp_path / "shapes", 7, 2, 64, seed=1)
    out = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "launch/build_shards.py",
         "--annotations", str(tmp_path / "shapes" / "annotations" / "instances_train.json"),
         "--images", str(tmp_path / "shapes" / "images" / "train"), "--out", str(out),
         "--shard-size", "3", "--no-progress", "--tracking-uri", mlflow_server.uri,
         "--experiment", "shards-test"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("shards-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "shards"
    assert run.data.params["shard_size"] == "3"
    assert run.data.metrics["samples"] == 7 and run.data.metrics["shards"] == 3
    assert run.data.metrics["images_per_s"] > 0
    assert "index.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
