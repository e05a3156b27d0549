"""The evaluation stage: one checkpoint (:func:`evaluate_checkpoint`), or every checkpoint a
training run writes, as it writes them (:func:`watch_training`).

Every rank loads the checkpoint and evaluates its share of the validation set (the loader
gives each sample to exactly one rank); rank 0 gathers the outputs, scores them, writes
the files and logs to MLflow. Decisions that all ranks must share (whether the checkpoint
loaded, which checkpoint to evaluate next) are taken together, so that no rank is left
waiting in a collective the others skipped.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.collectives import (
    all_gather_objects,
    broadcast_object,
    gather_objects,
    patient_cpu_group,
)
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import build_val_loader, read_manifest
from pipeline.data.ground_truth import read_ground_truth
from pipeline.distributed import DistInfo, device_for
from pipeline.modeling import model_args_from_config
from pipeline.rundir import FINISHED, entry_name, entry_step, list_entries, read_latest

from .checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    build_eval_model,
    dataset_labels,
    load_checkpoint,
)
from .coco_eval import IOU_TYPES, resolve_backend
from .inference import ModelPredictor, run_inference
from .report import METRICS_FILE, EvalReport, EvalSettings, score_outputs
from .tracking import log_evaluation

log = logging.getLogger(__name__)


def build_eval_settings(cfg: Config) -> EvalSettings:
    """``cfg.eval`` as :class:`EvalSettings`; a bad value fails with one line naming it."""
    e = cfg.eval
    bad = [t for t in e.iou_types if t not in IOU_TYPES]
    if bad or not e.iou_types:
        raise ConfigError(f"eval.iou_types: {list(e.iou_types)} (choose from {list(IOU_TYPES)})")
    try:
        resolve_backend(e.backend)  # fails early if faster is asked for and missing
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return EvalSettings(
        iou_types=tuple(dict.fromkeys(e.iou_types)),
        mask_threshold=e.mask_threshold,
        backend=e.backend,
        num_pictures=max(0, e.num_pictures),
        picture_score_thresh=e.picture_score_thresh,
    )


def _agree(ok: bool, message: str, info: DistInfo) -> str:
    """The first failing rank's message ("" when every rank succeeded), on every rank."""
    return next((m for m in all_gather_objects("" if ok else message) if m), "")


def fallback_args(cfg: Config, manifest) -> dict:
    """The config's model arguments, for a checkpoint that records none: model.num_classes=auto
    takes the validation shards' class count (a number is kept, and checked against it)."""
    auto = cfg.model.num_classes == "auto"
    return model_args_from_config(cfg, num_classes=manifest.num_classes if auto else None)


def load_model_everywhere(cfg: Config, checkpoint: str | Path, info: DistInfo, manifest):
    """(checkpoint, model, model output index -> the val shards' contiguous index) on every
    rank, or the same CheckpointError on every rank."""
    loaded, model, labels, message = None, None, None, ""
    try:
        loaded = load_checkpoint(checkpoint)
        model = build_eval_model(
            loaded,
            inference_args={
                "min_size_test": cfg.input.min_size_test,
                "max_size_test": cfg.input.max_size_test,
                "channels_last": cfg.model.channels_last,
            },
            fallback_args=fallback_args(cfg, manifest) if loaded.model_args is None else None,
        )
        labels = dataset_labels(
            loaded, model.model_args["num_classes"], manifest, f"data.val_shards ({manifest.root})"
        )
    except CheckpointError as error:
        message = str(error)
    message = _agree(not message, message, info)
    if message:
        raise CheckpointError(message)
    if info.is_main and loaded.label_map is not None:
        log.info("categories: %d of the model's outputs serve the %d of the val shards",
                 len(labels), len(manifest.categories))  # fmt: skip
    return loaded, model, labels


def evaluate_loaded(
    cfg: Config,
    loaded: LoadedCheckpoint,
    predict: Callable,
    out_dir: str | Path,
    info: DistInfo,
    *,
    settings: EvalSettings | None = None,
    labels: dict[int, int] | None = None,
    dataset: str | None = None,
) -> EvalReport | None:
    """Run ``predict`` over this rank's share, gather on rank 0 and score there (returns the
    report on rank 0, None elsewhere). ``labels`` maps the model's outputs to the val
    shards' contiguous indices (None: they are the same). ``dataset`` names the data in the
    metrics (default: the val shards' name)."""
    settings = settings or build_eval_settings(cfg)
    manifest = read_manifest(cfg.data.val_shards)
    loader = build_val_loader(
        cfg, info.rank, info.world_size, pin_memory=device_for(info).type == "cuda"
    )
    output = run_inference(
        predict, loader,
        contiguous_to_coco=manifest.contiguous_to_coco,
        labels=labels,
        mask_threshold=settings.mask_threshold,
        iou_types=settings.iou_types,
        num_pictures=settings.num_pictures if info.is_main else 0,
        picture_score_thresh=settings.picture_score_thresh,
        progress=info.is_main,
    )  # fmt: skip
    outputs = gather_objects(output)
    if not info.is_main:
        return None
    gt, gt_problems = read_ground_truth(cfg.data.val_shards)
    return score_outputs(
        outputs, gt=gt, gt_problems=gt_problems, manifest=manifest, settings=settings,
        out_dir=out_dir, checkpoint=str(loaded.path), step=loaded.step, dataset=dataset,
    )  # fmt: skip


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path,
    out_dir: str | Path,
    info: DistInfo,
    *,
    tracking_dir: str | Path | None = None,
    dataset: str | None = None,
) -> EvalReport | None:
    """Evaluate one checkpoint into ``out_dir`` and log it to MLflow (rank 0 returns the
    report). A missing or incompatible checkpoint raises CheckpointError on every rank.
    ``tracking_dir`` (default ``out_dir``) keeps the run.json of an "eval" MLflow run;
    ``dataset`` keys the metrics (default: the val shards' name)."""
    settings = build_eval_settings(cfg)
    manifest = read_manifest(cfg.data.val_shards)
    loaded, model, labels = load_model_everywhere(cfg, checkpoint, info, manifest)
    predict = ModelPredictor(model, device_for(info), mask_threshold=settings.mask_threshold)
    report = evaluate_loaded(
        cfg, loaded, predict, out_dir, info, settings=settings, labels=labels, dataset=dataset
    )
    del predict, model
    if report is not None:
        log_evaluation(cfg, loaded, report, tracking_dir or out_dir)
    return report


# --- watching a training run ---------------------------------------------------------------


def checkpoint_entries(checkpoint_dir: Path) -> list[str]:
    """The complete checkpoint entries (``step_N.pt`` files, ``step_N`` DeepSpeed
    directories) of a training run, by step."""
    return [path.name for path in list_entries(checkpoint_dir)]


def output_name(entry: str) -> str:
    """The output folder of a checkpoint entry: named by its step (``step_0000400.pt`` and
    the DeepSpeed directory ``step_0000400`` both -> ``step_0000400``)."""
    step = entry_step(entry)
    return entry if step is None else entry_name(step, directory=True)


def next_to_evaluate(
    checkpoint_dir: Path, done: set[str], *, only_latest: bool = False
) -> tuple[str | None, bool]:
    """(the oldest entry up to ``latest`` not yet evaluated, whether training finished and
    nothing is left); ``done`` names the entries or output folders evaluated, matched by
    step. ``only_latest``: ``latest`` or nothing. FINISHED is read before ``latest``:
    training writes it last, so a FINISHED seen first means the ``latest`` read after it is
    the final checkpoint."""
    finished = (checkpoint_dir / FINISHED).exists()
    latest = read_latest(checkpoint_dir) or ""
    if entry_step(latest) is None:
        return None, False
    done_steps = {entry_step(name) for name in done}
    pending = [
        name
        for name in ([] if only_latest else checkpoint_entries(checkpoint_dir))
        if entry_step(name) not in done_steps and entry_step(name) <= entry_step(latest)
    ]
    if entry_step(latest) not in done_steps and latest not in pending:
        pending.append(latest)  # named by latest but listed under another name (odd): try it
    if pending:
        return pending[0], False
    return None, finished


def watch_training(
    cfg: Config,
    train_dir: str | Path,
    out_dir: str | Path,
    info: DistInfo,
    *,
    poll_s: float | None = None,
    idle_timeout_s: float | None = None,
    all_checkpoints: bool = False,
    dataset: str | None = None,
) -> list[EvalReport]:
    """Evaluate each checkpoint of the training run in ``train_dir`` as it appears, into
    ``out_dir/step_N/``, until training has written FINISHED and its latest checkpoint is
    evaluated (or nothing new came for ``idle_timeout_s``, when positive). A run that had
    finished before the watch began gets its final checkpoint evaluated only, unless
    ``all_checkpoints``. A checkpoint that was evaluated before (its metrics.json exists,
    also under the folder name ``step_N.pt`` of before) is not evaluated again."""
    poll_s = cfg.eval.watch_poll_s if poll_s is None else poll_s
    idle_timeout_s = cfg.eval.watch_idle_timeout_s if idle_timeout_s is None else idle_timeout_s
    checkpoint_dir, out_dir = Path(train_dir) / "checkpoints", Path(out_dir)
    done = {p.parent.name for p in out_dir.glob(f"*/{METRICS_FILE}")}
    done = {name for name in done if entry_step(name) is not None}
    only_latest = not all_checkpoints and info.is_main and (checkpoint_dir / FINISHED).exists()
    if only_latest:
        print(f"watch: training in {train_dir} has finished: evaluating its final checkpoint "
              "only (--all-checkpoints: every one it kept)", flush=True)  # fmt: skip
    reports: list[EvalReport] = []
    last_news = time.monotonic()
    # The other ranks wait in this handshake while rank 0 polls, scores and uploads, for
    # hours between checkpoints: on a gloo group of its own with a long timeout, away from
    # the default group's timeout and NCCL's watchdog, which would abort the job.
    handshake = patient_cpu_group()
    while True:
        decision = None
        if info.is_main:
            name, finished = next_to_evaluate(checkpoint_dir, done, only_latest=only_latest)
            if name is not None:
                decision = ("evaluate", name)
            elif finished:
                decision = ("stop", "training finished and its last checkpoint is evaluated")
            elif idle_timeout_s > 0 and time.monotonic() - last_news > idle_timeout_s:
                decision = ("stop", f"no new checkpoint for {idle_timeout_s:.0f} s")
            else:
                decision = ("wait", "")
        action, detail = broadcast_object(decision, group=handshake)
        if action == "stop":
            if info.is_main:
                print(f"watch: {detail}; {len(done)} checkpoints evaluated", flush=True)
            return reports
        if action == "wait":
            time.sleep(poll_s)
            continue
        done.add(detail)
        last_news = time.monotonic()
        if info.is_main:
            print(f"watch: evaluating {checkpoint_dir / detail}", flush=True)
        try:
            report = evaluate_checkpoint(
                cfg, checkpoint_dir / detail, out_dir / output_name(detail), info,
                tracking_dir=out_dir, dataset=dataset,
            )  # fmt: skip
        except CheckpointError as error:  # e.g. deleted by the rotation meanwhile
            if info.is_main:
                log.warning("watch: skipped %s: %s", detail, error)
            continue
        if report is not None:
            reports.append(report)


def config_for(path: str | None, overrides: list[str], checkpoint: str | None, watch: str | None):
    """The evaluation's config: the file given, else the training run's config.yaml (in
    the watched directory, or in the run directory the checkpoint lies in), with the
    overrides on top. A checkpoint that does not exist is named first: searching above it
    for a config.yaml would report a typo as a missing training config."""
    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(
            f"checkpoint {checkpoint}: no such file or directory{_near(checkpoint)}"
        )
    if path is not None:
        return load_config(path, overrides)
    if watch is not None and not Path(watch).is_dir():
        # With --config the watched run may not have started yet; without, its config is needed.
        raise CheckpointError(f"--watch {watch}: no such directory{_near(watch)}")
    start = Path(watch if watch is not None else checkpoint or ".").resolve()
    for directory in (start, *start.parents[:2]):
        if (directory / "config.yaml").is_file():
            return load_config(directory / "config.yaml", overrides)
    raise CheckpointError(f"no --config given and no training config.yaml at or above {start}")


def _near(missing: str) -> str:
    """`` (did you mean SIBLING?)`` for the closest existing name beside a missing path."""
    path = Path(missing)
    try:
        siblings = [p.name for p in path.parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


__all__ = [
    "build_eval_settings",
    "checkpoint_entries",
    "config_for",
    "evaluate_checkpoint",
    "evaluate_loaded",
    "next_to_evaluate",
    "watch_training",
]
