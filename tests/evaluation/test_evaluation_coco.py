"""COCO scoring: perfect detections score 1.0 through the whole mapping back to the
annotation file's coordinates, and our numbers are pycocotools' numbers."""

import contextlib
import copy
import io
import logging
import math
import random

import pytest
from evaluation_helpers import MIN_SIZE_TEST, GroundTruthEcho, eval_config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.data import build_val_loader, read_manifest
from pipeline.data.ground_truth import read_ground_truth
from pipeline.evaluation.coco_eval import STAT_NAMES, coco_evaluate
from pipeline.evaluation.inference import run_inference
from pipeline.evaluation.report import EvalSettings, score_outputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def echo_evaluation(shards, out_dir, min_size, sizes_for_mapping=None, backend="pycocotools"):
    cfg = eval_config(shards, f"input.min_size_test={min_size}")
    manifest = read_manifest(shards)
    gt, problems = read_ground_truth(shards)
    echo = GroundTruthEcho(build_val_loader(cfg, 0, 1), gt, sizes_for_mapping)
    output = run_inference(
        echo, echo, contiguous_to_coco=manifest.contiguous_to_coco, mask_threshold=0.5,
        iou_types=("bbox", "segm"), num_pictures=1,
    )  # fmt: skip
    settings = EvalSettings(backend=backend, num_pictures=1)
    return score_outputs([output], gt=gt, gt_problems=problems, manifest=manifest,
                         settings=settings, out_dir=out_dir)  # fmt: skip


@pytest.mark.parametrize("min_size", [MIN_SIZE_TEST, 128])  # shrinks, then enlarges, images
def test_ground_truth_as_detections_scores_one(eval_shards, tmp_path, min_size):
    sizes = {(i["height"], i["width"]) for i in read_ground_truth(eval_shards)[0]["images"]}
    assert sizes == {(96, 96), (96, 72)}  # two aspect ratios: each axis is mapped on its own
    report = echo_evaluation(eval_shards, tmp_path, min_size)
    metrics = report.metrics
    assert metrics["images_evaluated"] == 11 and metrics["images_failed"] == 0
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(1.0, abs=1e-12), (iou_type, name)
        assert all(v == pytest.approx(1.0) for v in metrics["per_category"][iou_type].values())
    assert {p.name for p in report.files} == {"metrics.json", "bbox.json", "segm.json"}
    assert len(report.pictures) == 1 and report.pictures[0].read_bytes()[:4] == b"\x89PNG"


def test_wrong_mapping_is_caught(eval_shards, tmp_path):
    # Results left at the model's input size (what forgetting the mapping back gives).
    report = echo_evaluation(eval_shards, tmp_path, MIN_SIZE_TEST, lambda sizes: sizes)
    assert report.metrics["bbox/AP"] < 0.5 and report.metrics["segm/AP"] < 0.5


def misses_and_false_positives(gt: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Results with known errors: 25% of objects missed, shifted boxes, wrong classes, extra
    boxes, and, for segm, masks eroded or swapped between objects."""
    rng = random.Random(seed)
    results = {"bbox": [], "segm": []}
    annotations = gt["annotations"]
    for annotation in annotations:
        if rng.random() < 0.25:
            continue  # a miss
        x, y, w, h = annotation["bbox"]
        score = rng.random()
        shift = rng.uniform(-0.3, 0.3) * w
        category = annotation["category_id"] if rng.random() < 0.85 else rng.choice([1, 2, 3])
        common = {"image_id": annotation["image_id"], "category_id": category, "score": score}
        results["bbox"].append({**common, "bbox": [x + shift, y, w, h * rng.uniform(0.8, 1.2)]})
        other = rng.choice(annotations) if rng.random() < 0.2 else annotation
        results["segm"].append({**common, "segmentation": other["segmentation"]})
        if rng.random() < 0.3:  # a false positive
            fp = {**common, "score": rng.random(), "category_id": rng.choice([1, 2, 3])}
            results["bbox"].append({**fp, "bbox": [x + w / 2, y + h / 3, w, h]})
    return results


def pycocotools_direct(gt: dict, results: list[dict], iou_type: str):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.fixture(scope="module")
def gt_with_crowd(eval_shards):
    gt = read_ground_truth(eval_shards)[0]
    crowd = copy.deepcopy(gt["annotations"][0])  # a crowd region over a real object
    crowd.update(id=10**6, iscrowd=1)
    gt["annotations"].append(crowd)
    return gt


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_known_errors_match_pycocotools(gt_with_crowd, backend, iou_type):
    results = misses_and_false_positives(gt_with_crowd)[iou_type]
    reference = pycocotools_direct(gt_with_crowd, results, iou_type)
    ours = coco_evaluate(gt_with_crowd, results, iou_type, backend=backend)
    assert ours.backend == backend
    assert 0.1 < ours.stats["AP"] < 0.9  # errors that matter, not a trivial case
    for name, value in zip(STAT_NAMES, reference.stats, strict=True):
        assert ours.stats[name] == pytest.approx(value, abs=1e-12), name
    names = {c["id"]: c["name"] for c in gt_with_crowd["categories"]}
    for k, category in enumerate(reference.params.catIds):
        precision = reference.eval["precision"][:, :, k, 0, -1]
        expected = precision[precision > -1].mean()
        assert ours.per_category[names[category]] == pytest.approx(expected, abs=1e-12)


def test_image_subset_and_no_detections(gt_with_crowd):
    results = misses_and_false_positives(gt_with_crowd)["bbox"]
    subset = [1, 2, 3]
    ours = coco_evaluate(gt_with_crowd, results, "bbox", image_ids=subset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt_with_crowd)
        coco.createIndex()
        reference = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        reference.params.imgIds = subset
        reference.evaluate(), reference.accumulate(), reference.summarize()
    assert ours.stats["AP"] == pytest.approx(reference.stats[0], abs=1e-12)
    empty = coco_evaluate(gt_with_crowd, [], "segm")
    assert empty.stats["AP"] == 0.0 and empty.stats["AR100"] == 0.0
    assert not any(math.isnan(v) for v in empty.per_category.values())


def test_unknown_backend_and_iou_type_are_refused(gt_with_crowd):
    with pytest.raises(ValueError, match=r"eval\.backend"):
        coco_evaluate(gt_with_crowd, [], "bbox", backend="fast")
    with pytest.raises(ValueError, match=r"eval\.iou_types"):
        coco_evaluate(gt_with_crowd, [], "keypoints")


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_the_library_prints_and_logs_nothing_of_its_own(gt_with_crowd, backend, caplog, capfd):
    # faster-coco-eval logs its AP table at INFO: under our logging setup every evaluation
    # showed the table twice, its own before ours.
    results = misses_and_false_positives(gt_with_crowd)["segm"]
    with caplog.at_level(logging.DEBUG):
        coco_evaluate(gt_with_crowd, results, "segm", backend=backend)
    assert [r.getMessage() for r in caplog.records if not r.name.startswith("pipeline")] == []
    assert capfd.readouterr() == ("", "")
