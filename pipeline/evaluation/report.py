"""Rank 0's part of an evaluation: gather what every rank saw, account for every image of
the manifest, score with COCOeval and write DIR/metrics.json, bbox.json, segm.json and the
pictures.

Accounting. ``images_evaluated`` is the number of distinct images a rank returned results
for (an image with no detection counts) that the ground truth holds; ``images_failed`` is
the manifest's total minus that, so the two always add up. The failures are listed: each
sample the loader could not decode by its file name, each shard that broke off with the
count it lost, and the ground-truth images that no rank returned. COCOeval runs on the
evaluated images only (its ``imgIds`` and the ground truth are restricted to them), so an
unreadable image is neither a miss nor a false positive. The images of the annotation file
that the shard build skipped (a corrupt file: the shards' skipped.json lists them) are not in
the manifest's total; their count is ``images_skipped_by_shard_build``, and said.

metrics.json names the dataset (``"dataset"``: ``--name``, else the shards' name), which keys
the MLflow metrics (``shapes_val/segm/AP``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.manifest import ShardManifest, safe_name

from .coco_eval import CocoScores, category_table, coco_evaluate, subset_ground_truth, summary_lines
from .inference import RankOutput
from .pictures import save_pictures

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class EvalSettings:
    """How the predictions are scored and shown (``eval.*`` of the config)."""

    iou_types: tuple[str, ...] = ("bbox", "segm")
    mask_threshold: float = 0.5
    backend: str = "auto"
    num_pictures: int = 8
    picture_score_thresh: float = 0.5


@dataclass
class EvalReport:
    """The metrics (what metrics.json holds) and the files written."""

    metrics: dict
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)

    def scalar_metrics(self) -> dict[str, float]:
        """The numbers to log as metrics: every IoU type's summary, per-category AP and the
        image counts and throughput."""
        scalars = {
            key: float(value)
            for key, value in self.metrics.items()
            if "/" in key or key in ("images_evaluated", "images_failed", "images_per_s")
        }
        for iou_type, table in self.metrics.get("per_category", {}).items():
            for name, value in table.items():
                if value is not None:
                    scalars[f"{iou_type}/AP-{name}"] = float(value)
        return {key: value for key, value in scalars.items() if math.isfinite(value)}


def account_images(gt: dict, outputs: Sequence[RankOutput]) -> tuple[list[int], list[dict]]:
    """The evaluated image ids (sorted) and the failure records (see the module doc)."""
    gt_ids = {image["id"] for image in gt["images"]}
    failures = [record for output in outputs for record in output.failures]
    evaluated: set[int] = set()
    for output in outputs:
        for image_id in output.image_ids:
            if image_id in evaluated:
                raise RuntimeError(f"image {image_id} was evaluated twice (duplicate image id?)")
            if image_id in gt_ids:
                evaluated.add(image_id)
            else:
                failures.append(
                    {"image_id": image_id, "image": None, "shard": None, "count": 1,
                     "reason": "not in the ground truth (its record did not read there)"}
                )  # fmt: skip
    named = {record["image_id"] for record in failures if record.get("image_id") is not None}
    for image in gt["images"]:
        if image["id"] not in evaluated and image["id"] not in named:
            failures.append(
                {"image_id": image["id"], "image": image["file_name"], "shard": None, "count": 0,
                 "reason": "in the ground truth, not returned by the loader (counted above)"}
            )  # fmt: skip
    return sorted(evaluated), failures


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def score_outputs(
    outputs: Sequence[RankOutput],
    *,
    gt: dict,
    gt_problems: list[dict],
    manifest: ShardManifest,
    settings: EvalSettings,
    out_dir: str | Path,
    checkpoint: str = "",
    step: int | None = None,
    dataset: str | None = None,
) -> EvalReport:
    """Score the gathered outputs, print the summary and write the files into ``out_dir``.
    ``dataset`` names the data, made safe (default: the manifest's name)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated, failures = account_images(gt, outputs)
    keep = set(evaluated)
    gt_evaluated = subset_ground_truth(gt, evaluated)
    seconds = max((output.seconds for output in outputs), default=0.0)
    metrics: dict = {
        "dataset": safe_name(dataset or "") or manifest.name,
        "shards": str(manifest.root),
        "checkpoint": checkpoint,
        "step": step,
        "images_total": manifest.total_samples,
        "images_evaluated": len(evaluated),
        "images_failed": manifest.total_samples - len(evaluated),
        "images_skipped_by_shard_build": manifest.skipped_images,
        "source_file": manifest.source_file,
        "failures": failures,
        "ground_truth_problems": gt_problems,
        "world_size": len(outputs),
        "inference_seconds": seconds,
        "images_per_s": len(evaluated) / seconds if seconds > 0 else 0.0,
    }
    scores: dict[str, CocoScores] = {}
    files = []
    for iou_type in settings.iou_types:
        results = [
            entry for output in outputs for entry in output.results.get(iou_type, [])
            if entry["image_id"] in keep
        ]  # fmt: skip
        results.sort(key=lambda entry: entry["image_id"])  # stable: per-image order is kept
        path = out_dir / f"{iou_type}.json"
        path.write_text(json.dumps(results))
        files.append(path)
        scores[iou_type] = coco_evaluate(
            gt_evaluated, results, iou_type, image_ids=evaluated, backend=settings.backend
        )
        for name, value in scores[iou_type].stats.items():
            metrics[f"{iou_type}/{name}"] = value
    metrics["per_category"] = {
        iou_type: {name: _json_number(v) for name, v in s.per_category.items()}
        for iou_type, s in scores.items()
    }
    metrics["coco_eval_seconds"] = {iou_type: s.seconds for iou_type, s in scores.items()}
    metrics["backend"] = next(iter(scores.values())).backend if scores else settings.backend
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    files.insert(0, metrics_path)
    pictures = [picture for output in outputs for picture in output.pictures]
    picture_paths = save_pictures(
        pictures[: settings.num_pictures], out_dir / "pictures", gt=gt,
        class_names=manifest.class_names, contiguous_of=manifest.coco_to_contiguous,
    )  # fmt: skip
    print_summary(metrics, scores)
    return EvalReport(metrics, out_dir, files, picture_paths)


def print_summary(metrics: dict, scores: dict[str, CocoScores]):
    lines = [
        f"{metrics['dataset']}: evaluated {metrics['images_evaluated']} of "
        f"{metrics['images_total']} images ({metrics['images_failed']} failed) "
        f"from {metrics['checkpoint']} (step {metrics['step']}), "
        f"{metrics['images_per_s']:.1f} images/s"
    ]
    skipped = metrics["images_skipped_by_shard_build"]
    if skipped:
        lines.append(
            f"  not in the shards: {skipped} more image{'s' if skipped > 1 else ''} of "
            f"{metrics['source_file']}, skipped by the shard build (see "
            f"{Path(metrics['shards']) / 'skipped.json'})"
        )
    for record in metrics["failures"]:
        what = record["image"] or f"{record['count']} samples of {record['shard']}"
        lines.append(f"  not evaluated: {what}: {record['reason']}")
    for iou_type, s in scores.items():
        lines.append(f"{iou_type} ({s.backend}, {s.seconds:.2f} s):")
        lines.extend(summary_lines(s))
    if scores:
        lines.append("per-category AP:")
        lines.extend(category_table(scores))
    print("\n".join(lines), flush=True)
