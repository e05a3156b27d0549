"""COCOeval for bbox and segm: the standard 12-number summary and a per-category AP table.

pycocotools is the reference. faster-coco-eval (``faster_coco_eval.COCOeval_faster``, C++
matching and accumulation) gives the same numbers (tests/evaluation checks it on cases with
misses, false positives and crowd regions) several times faster; ``backend="auto"`` uses it
when it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "pycocotools", "faster")
IOU_TYPES = ("bbox", "segm")
# COCOeval.stats, in order (maxDets 1/10/100; areas all/small/medium/large).
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
STAT_LINES = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def resolve_backend(backend: str) -> str:
    """pycocotools or faster; auto picks faster when faster-coco-eval is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faster" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    if backend == "faster" and importlib.util.find_spec("faster_coco_eval") is None:
        raise ValueError("eval.backend=faster, but faster-coco-eval is not installed")
    return backend


@dataclass
class CocoScores:
    iou_type: str
    stats: dict[str, float]
    """The 12 summary numbers by STAT_NAMES (-1 where COCOeval has nothing to average)."""
    per_category: dict[str, float]
    """AP@[.5:.95] per category name (area all, 100 detections); NaN without ground truth
    and detections."""
    seconds: float
    backend: str


def subset_ground_truth(gt: dict, image_ids: Iterable[int]) -> dict:
    """The ground truth of ``image_ids`` only (images and their annotations)."""
    keep = set(image_ids)
    return {
        **gt,
        "images": [image for image in gt["images"] if image["id"] in keep],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
    }


def _coco_classes(backend: str):
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _ground_truth_api(coco_class, gt: dict):
    api = coco_class()
    api.dataset = gt
    api.createIndex()
    return api


def _results_api(coco_class, gt_api, gt: dict, results: Sequence[dict]):
    if results:
        # loadRes adds keys (area, id, bbox or segmentation) to the entries: give it copies.
        return gt_api.loadRes([dict(entry) for entry in results])
    # loadRes cannot take an empty list; no detections at all scores 0 where there is ground
    # truth, as it should.
    return _ground_truth_api(
        coco_class, {"images": gt["images"], "categories": gt["categories"], "annotations": []}
    )


@contextlib.contextmanager
def _library_log_level(level: int):
    """faster-coco-eval's loggers at ``level`` or above only, for the duration."""
    library = logging.getLogger("faster_coco_eval")  # its modules log to children of it
    before = library.level
    library.setLevel(level)
    try:
        yield
    finally:
        library.setLevel(before)


def coco_evaluate(
    gt: dict,
    results: Sequence[dict],
    iou_type: str,
    *,
    image_ids: Iterable[int] | None = None,
    backend: str = "auto",
) -> CocoScores:
    """Score ``results`` (COCO result entries) against ``gt`` (a COCO dict) over
    ``image_ids`` (default: every ground-truth image)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"eval.iou_types: {iou_type!r} is not one of {', '.join(IOU_TYPES)}")
    backend = resolve_backend(backend)
    coco_class, eval_class = _coco_classes(backend)
    ids = sorted({image["id"] for image in gt["images"]} if image_ids is None else set(image_ids))
    start = time.perf_counter()
    # Both report their progress and their own AP table: pycocotools prints it, and
    # faster-coco-eval logs it at INFO, which our logging setup shows before our table.
    with contextlib.redirect_stdout(io.StringIO()), _library_log_level(logging.WARNING):
        gt_api = _ground_truth_api(coco_class, gt)
        dt_api = _results_api(coco_class, gt_api, gt, results)
        evaluator = eval_class(gt_api, dt_api, iou_type)
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    seconds = time.perf_counter() - start
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=False)}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
    per_category = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_category[names[category_id]] = float(values.mean()) if values.size else math.nan
    return CocoScores(iou_type, stats, per_category, seconds, backend)


def summary_lines(scores: CocoScores) -> list[str]:
    """pycocotools' printed summary, one line per number."""
    return [
        f" {line} = {scores.stats[name]:0.3f}"
        for line, name in zip(STAT_LINES, STAT_NAMES, strict=True)
    ]


def category_table(scores_by_type: dict[str, CocoScores]) -> list[str]:
    """Per-category AP, one column per IoU type."""
    types = list(scores_by_type)
    names = list(next(iter(scores_by_type.values())).per_category) if types else []
    width = max([len("category"), *map(len, names)])
    lines = ["  ".join(["category".ljust(width), *(f"{t:>6}" for t in types)])]
    for name in names:
        cells = [scores_by_type[t].per_category.get(name, math.nan) for t in types]
        lines.append("  ".join([name.ljust(width), *(f"{v:6.3f}" for v in cells)]))
    return lines
