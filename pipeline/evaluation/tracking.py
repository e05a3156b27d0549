"""The evaluation's MLflow logging: into the training run that made the checkpoint.

The checkpoint's ``"tracking"`` names that run (``run_id``, ``uri``). Its metrics are logged
there at the checkpoint's step, keyed by the dataset as detectron2 does:
``<dataset>/<iou type>/<stat>`` (``shapes_val/segm/AP``, ``shapes_val/segm/AP-circle``,
``shapes_val/images_evaluated``), so that a watcher beside training draws an AP-against-step
curve in the training run itself, and one checkpoint evaluated on two datasets keeps both
series. The run is tagged ``eval.last_step`` / ``eval.checkpoint``. The files (metrics.json,
bbox.json, segm.json) and the pictures go under the artifact folder
``eval/<dataset>/<checkpoint>/`` (``eval/shapes_val/step_0000400/``). A checkpoint
without a run (a converted torchvision model, tracking off in training), or whose run
cannot be reached, is logged into a run of the stage "eval" kept in the evaluation's output
directory (its run.json), which the checkpoints of one --watch share. Like all tracking,
failures only warn.
"""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.tracking import Tracker, recorded_run

from .checkpoints import LoadedCheckpoint
from .report import EvalReport

log = logging.getLogger(__name__)


def metric_prefix(dataset: str) -> str:
    """``shapes_val/``: what the dataset's metric keys start with."""
    return f"{dataset}/"


def artifact_folder(dataset: str, checkpoint: LoadedCheckpoint) -> str:
    """``eval/shapes_val/step_0000400``: the checkpoint's entry name without ``.pt``."""
    name = checkpoint.name.removesuffix(".pt") or checkpoint.name
    return f"eval/{dataset}/{name}"


def open_tracker(cfg: Config, checkpoint: LoadedCheckpoint, run_dir) -> tuple[Tracker, bool]:
    """(tracker, attached): the training run's tracker when the checkpoint names a run that
    can be reached, else a new "eval" run."""
    tracking = cfg.tracking
    common = dict(run_dir=run_dir, stage="eval", experiment=tracking.experiment,
                  enabled=tracking.enabled)  # fmt: skip
    saved = checkpoint.tracking
    # A checkpoint saved while the server was away names no run; the training run's
    # run.json has it once MLflow created it.
    run_id = saved.get("run_id") or recorded_run(saved.get("run_dir"), saved.get("uri"))
    if tracking.enabled and run_id:
        tracker = Tracker(**common, uri=checkpoint.tracking.get("uri") or tracking.uri,
                          run_id=run_id)  # fmt: skip
        if tracker.enabled and tracker.run_id == run_id:
            return tracker, True
        tracker.close(timeout=1)
        log.warning("tracking: training run %s not reachable; logging into a new run", run_id)
    tags = {"eval.checkpoint": str(checkpoint.path), "eval.source": checkpoint.source}
    tracker = Tracker(**common, uri=tracking.uri, run_name=tracking.run_name or "eval",
                      tags=tags)  # fmt: skip
    return tracker, False


def log_evaluation(
    cfg: Config, checkpoint: LoadedCheckpoint, report: EvalReport, run_dir
) -> str | None:
    """Log the report's metrics, files and pictures; returns the run id (None when tracking
    is off or failed). ``run_dir`` keeps the run.json of an "eval" run."""
    if not cfg.tracking.enabled:
        return None
    tracker, _ = open_tracker(cfg, checkpoint, run_dir)
    step = checkpoint.step if checkpoint.step is not None else 0
    dataset = report.metrics["dataset"]
    prefix = metric_prefix(dataset)
    metrics = {prefix + key: value for key, value in report.scalar_metrics().items()}
    tracker.log_metrics(metrics, step=step)
    tracker.set_tags(
        {"eval.last_step": step, "eval.checkpoint": str(checkpoint.path), "evaluated": "true"}
    )
    folder = artifact_folder(dataset, checkpoint)
    for path in report.files:
        tracker.log_artifact(path, folder)
    for path in report.pictures:
        tracker.log_artifact(path, f"{folder}/pictures")
    run_id = tracker.run_id if tracker.enabled else None
    tracker.close()  # delivers what is queued; an attached run keeps its status (training's)
    return run_id
