"""MLflow: the evaluation's metrics go into the training run of the checkpoint, at its step
(a real ``mlflow server`` on 127.0.0.1), and --watch follows a training run's checkpoints."""

import importlib.util
import threading
import time

import pytest
import torch
from evaluation_helpers import (
    REPO,
    eval_config,
    publish_checkpoint,
    tiny_model,
    training_checkpoint,
)
from mlflow.tracking import MlflowClient

from pipeline.data import read_manifest
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.distributed import DistInfo
from pipeline.evaluation import evaluate_checkpoint, watch_training
from pipeline.tracking import Tracker

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def training_run(server, run_dir) -> str:
    """A training run on the server that is still RUNNING, with a loss curve."""
    tracker = Tracker(run_dir=run_dir, stage="train", uri=server.uri, experiment="eval-tests")
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert tracker.flush(30)
    return tracker.run_id


def artifact_paths(client, run_id, path=None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_metrics_go_into_the_checkpoints_training_run(eval_shards, mlflow_server, tmp_path):
    run_id = training_run(mlflow_server, tmp_path / "train")
    checkpoint = training_checkpoint(tiny_model(), 40, run_id=run_id, uri=mlflow_server.uri)
    path = publish_checkpoint(tmp_path / "train", 40, checkpoint, finished=True)
    # tracking.uri is not set: the checkpoint says where its run lives.
    cfg = eval_config(eval_shards, "tracking.enabled=true", "tracking.experiment=eval-tests")
    report = evaluate_checkpoint(cfg, tmp_path / "train", tmp_path / "eval", DistInfo())

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # training's run: the evaluation leaves it open
    name = read_manifest(eval_shards).name  # the metrics are keyed by the dataset
    assert report.metrics["dataset"] == name == f"{eval_shards.parent.name}_val"
    history = client.get_metric_history(run_id, f"{name}/segm/AP")
    assert [(m.step, m.value) for m in history] == [(40, report.metrics["segm/AP"])]
    assert f"{name}/bbox/AP50" in run.data.metrics
    assert f"{name}/images_evaluated" in run.data.metrics
    assert f"{name}/segm/AP-circle" in run.data.metrics
    assert not any(key.startswith("eval/") for key in run.data.metrics)
    assert run.data.tags["evaluated"] == "true" and run.data.tags["eval.last_step"] == "40"
    assert run.data.tags["eval.checkpoint"] == str(path)
    artifacts = artifact_paths(client, run_id)
    folder = f"eval/{name}/step_0000040"
    assert {f"{folder}/{name}" for name in ("metrics.json", "bbox.json", "segm.json")} <= artifacts
    pictures = [a for a in artifacts if a.startswith(f"{folder}/pictures/")]
    assert len(pictures) == 2 and all(p.endswith(".png") for p in pictures)


@pytest.mark.slow
def test_a_checkpoint_without_a_run_gets_a_new_one(
    eval_shards, mlflow_server, tmp_path, checkpoint_file
):
    cfg = eval_config(eval_shards, "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
                      "tracking.experiment=eval-new", "eval.num_pictures=0")  # fmt: skip
    evaluate_checkpoint(cfg, checkpoint_file, tmp_path / "eval", DistInfo())
    # A checkpoint naming a run the server does not have (deleted, another server's).
    gone = training_checkpoint(tiny_model(), 50, run_id="0" * 32, uri=mlflow_server.uri)
    torch.save(gone, tmp_path / "gone.pt")
    evaluate_checkpoint(cfg, tmp_path / "gone.pt", tmp_path / "eval-gone", DistInfo())
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("eval-new")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert len(runs) == 2
    for run, step in zip(runs, [40, 50], strict=True):
        assert run.data.tags["stage"] == "eval" and run.info.status == "FINISHED"
        history = client.get_metric_history(
            run.info.run_id, f"{eval_shards.parent.name}_val/bbox/AP"
        )
        assert [m.step for m in history] == [step]


@pytest.mark.slow
def test_watch_evaluates_checkpoints_as_training_writes_them(eval_shards, mlflow_server, tmp_path):
    train_dir, out = tmp_path / "train", tmp_path / "eval"
    run_id = training_run(mlflow_server, train_dir)
    steps = [10, 20, 30]

    def train():
        """Writes checkpoint 10, waits until it is evaluated, then 20 and 30 at once and
        FINISHED: the watcher must take both, in order, before it stops."""
        model = tiny_model()
        for step in steps:
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.weight.mul_(1.5)  # "training"
            checkpoint = training_checkpoint(model, step, run_id=run_id, uri=mlflow_server.uri)
            publish_checkpoint(train_dir, step, checkpoint, finished=step == steps[-1])
            deadline = time.monotonic() + 120
            while step == steps[0] and not (out / f"step_{step:07d}" / "metrics.json").exists():
                assert time.monotonic() < deadline
                time.sleep(0.1)

    writer = threading.Thread(target=train)
    cfg = eval_config(eval_shards, "tracking.enabled=true", "tracking.experiment=eval-tests",
                      "eval.num_pictures=1", "eval.watch_poll_s=0.2",
                      "eval.watch_idle_timeout_s=300")  # fmt: skip
    writer.start()
    try:
        reports = watch_training(cfg, train_dir, out, DistInfo())
    finally:
        writer.join()
    assert [r.metrics["step"] for r in reports] == steps
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    history = client.get_metric_history(run_id, f"{read_manifest(eval_shards).name}/bbox/AR100")
    assert sorted(m.step for m in history) == steps  # an AR-against-step curve in training's run
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        r.metrics["bbox/AR100"] for r in reports
    ]
    # Folders named by step (not step_N.pt/), DDP files and DeepSpeed directories alike.
    assert {p.name for p in out.iterdir() if p.is_dir()} == {f"step_{s:07d}" for s in steps}
    # A watcher started again finds everything evaluated and FINISHED: it stops at once.
    assert watch_training(cfg, train_dir, out, DistInfo()) == []


@pytest.fixture(scope="module")
def second_val_shards(tmp_path_factory):
    """Another validation set (5 images, another seed), built with a name of its own."""
    root = tmp_path_factory.mktemp("second_set")
    make_shapes_dataset(root, 0, 5, 96, seed=9)
    out = root / "shards"
    build_shards(root / "annotations" / "instances_val.json", root / "images" / "val", out,
                 shard_size=3, progress=False, name="other_val")  # fmt: skip
    return out


@pytest.mark.slow
def test_one_checkpoint_on_two_datasets_keeps_both_series(
    eval_shards, second_val_shards, mlflow_server, tmp_path, capsys
):
    # The second evaluation replaced the first's eval/segm/AP at the same step.
    run_id = training_run(mlflow_server, tmp_path / "train")
    checkpoint = training_checkpoint(tiny_model(), 40, run_id=run_id, uri=mlflow_server.uri)
    publish_checkpoint(tmp_path / "train", 40, checkpoint, finished=True)
    reports = {}
    for shards, given in ((eval_shards, None), (second_val_shards, None), (eval_shards, "mine")):
        cfg = eval_config(shards, "tracking.enabled=true", "eval.num_pictures=0")
        report = evaluate_checkpoint(
            cfg,
            tmp_path / "train",
            tmp_path / f"eval-{given}-{shards.parent.name}",
            DistInfo(),
            dataset=given,
        )
        reports[report.metrics["dataset"]] = report
    first = read_manifest(eval_shards).name
    assert sorted(reports) == sorted([first, "other_val", "mine"])
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for name, images in ((first, 11), ("other_val", 5), ("mine", 11)):
        history = client.get_metric_history(run_id, f"{name}/images_evaluated")
        assert [(m.step, m.value) for m in history] == [(40, images)], name
        history = client.get_metric_history(run_id, f"{name}/segm/AP")
        assert [(m.step, m.value) for m in history] == [(40, reports[name].metrics["segm/AP"])]
    artifacts = artifact_paths(client, run_id)
    for name in (first, "other_val", "mine"):  # none overwrites another's files
        assert f"eval/{name}/step_0000040/metrics.json" in artifacts

    # launch/compare.py: by default a row per dataset's AP, the runs side by side.
    spec = importlib.util.spec_from_file_location("compare", REPO / "launch" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    capsys.readouterr()
    out = tmp_path / "curves.png"
    assert compare.main([run_id, "--uri", mlflow_server.uri, "--out", str(out)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip()}  # fmt: skip
    for name, images in ((first, "11.0000"), ("other_val", "5.0000"), ("mine", "11.0000")):
        assert rows[f"{name}/images_evaluated"] == [images]
        assert f"{name}/segm/AP" in rows and f"{name}/bbox/AP" in rows
    assert out.stat().st_size > 0
