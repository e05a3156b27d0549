"""Images that cannot be read are reported, counted and left out of the ground truth and the
results; the rest of the set is evaluated (and a bad image is no miss)."""

import json

import pytest
from evaluation_helpers import GroundTruthEcho, damaged_copy, eval_config

from pipeline.config import ConfigError
from pipeline.data import build_val_loader, read_manifest
from pipeline.data.ground_truth import read_ground_truth
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.distributed import DistInfo
from pipeline.evaluation import build_eval_settings, evaluate_checkpoint
from pipeline.evaluation.inference import run_inference
from pipeline.evaluation.report import EvalSettings, score_outputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def damaged(eval_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "shards"
    return out, damaged_copy(eval_shards, out)


def failed_names(metrics: dict) -> set[str]:
    return {record["image"] for record in metrics["failures"] if record["image"]}


def test_damaged_samples_are_reported_and_the_rest_scores_one(damaged, tmp_path):
    shards, what = damaged
    gt, problems = read_ground_truth(shards)
    gt_ids = {image["id"] for image in gt["images"]}
    # The ground truth keeps every readable record of the damaged shards.
    assert what["corrupt"]["image_id"] in gt_ids  # its record is fine, its image is not
    assert what["bad_record"]["image_id"] not in gt_ids
    assert what["lost"]["image_id"] not in gt_ids
    assert len(gt_ids) == 9 and any(p["member"] == what["bad_member"] for p in problems)

    cfg = eval_config(shards)
    manifest = read_manifest(shards)
    echo = GroundTruthEcho(build_val_loader(cfg, 0, 1), gt)
    output = run_inference(echo, echo, contiguous_to_coco=manifest.contiguous_to_coco,
                           mask_threshold=0.5, iou_types=("bbox", "segm"))  # fmt: skip
    report = score_outputs([output], gt=gt, gt_problems=problems, manifest=manifest,
                           settings=EvalSettings(num_pictures=0), out_dir=tmp_path)  # fmt: skip
    metrics = report.metrics
    assert metrics["images_total"] == 11
    assert metrics["images_evaluated"] == 8 and metrics["images_failed"] == 3
    assert sum(record["count"] for record in metrics["failures"]) == 3  # all accounted for
    # A perfect detector still scores 1: the unreadable images count as no misses.
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)
    assert what["corrupt"]["file_name"] in failed_names(metrics)
    reasons = " ".join(r["reason"] for r in metrics["failures"])
    assert "unreadable (truncated or damaged shard)" in reasons
    assert any(r["shard"].endswith("shard-000003.tar") and r["count"] == 1
               for r in metrics["failures"])  # fmt: skip
    assert json.loads((tmp_path / "metrics.json").read_text())["images_failed"] == 3


def test_evaluation_of_damaged_shards_with_two_workers(damaged, tmp_path, checkpoint_file, capsys):
    shards, what = damaged
    cfg = eval_config(shards, "data.num_workers=2", "eval.num_pictures=0")
    report = evaluate_checkpoint(cfg, checkpoint_file, tmp_path / "out", DistInfo())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(report.metrics))
    assert metrics["images_evaluated"] == 8 and metrics["images_failed"] == 3
    assert what["corrupt"]["file_name"] in failed_names(metrics)
    results = json.loads((tmp_path / "out" / "segm.json").read_text())
    gt_ids = {image["id"] for image in read_ground_truth(shards)[0]["images"]}
    assert results and {r["image_id"] for r in results} <= gt_ids - {what["corrupt"]["image_id"]}
    printed = capsys.readouterr().out
    assert "evaluated 8 of 11 images (3 failed)" in printed
    assert f"not evaluated: {what['corrupt']['file_name']}" in printed


def test_bbox_only_and_bad_settings(eval_shards, tmp_path, checkpoint_file):
    cfg = eval_config(eval_shards, "eval.iou_types=[bbox]", "eval.num_pictures=1")
    report = evaluate_checkpoint(cfg, checkpoint_file, tmp_path, DistInfo())
    assert "bbox/AP" in report.metrics and "segm/AP" not in report.metrics
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json", "bbox.json", "pictures"}
    with pytest.raises(ConfigError, match=r"eval\.iou_types: \['keypoints'\]"):
        build_eval_settings(eval_config(eval_shards, "eval.iou_types=[keypoints]"))


def test_images_the_shard_build_skipped_are_said_and_counted(tmp_path, checkpoint_file, capsys):
    # "evaluated 4 of 4 images" said nothing of the image the shard build had left out.
    make_shapes_dataset(tmp_path, 0, 5, 96, seed=4)
    coco = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    (tmp_path / "images" / "val" / coco["images"][2]["file_name"]).write_bytes(b"not an image")
    shards = tmp_path / "shards"
    build_shards(tmp_path / "annotations" / "instances_val.json", tmp_path / "images" / "val",
                 shards, shard_size=3, progress=False)  # fmt: skip
    cfg = eval_config(shards, "eval.num_pictures=0")
    report = evaluate_checkpoint(cfg, checkpoint_file, tmp_path / "out", DistInfo())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (
        metrics["images_skipped_by_shard_build"]
        == 1
        == report.metrics["images_skipped_by_shard_build"]
    )
    assert metrics["images_total"] == metrics["images_evaluated"] == 4
    assert metrics["dataset"] == f"{tmp_path.name}_val"
    lines = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(lines) if "evaluated 4 of 4 images" in line)
    assert lines[first].startswith(f"{tmp_path.name}_val: evaluated 4 of 4 images (0 failed)")
    assert lines[first + 1] == (
        "  not in the shards: 1 more image of instances_val.json, skipped by the shard build "
        f"(see {shards / 'skipped.json'})"
    )
