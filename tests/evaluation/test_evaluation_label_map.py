"""Evaluation maps a model's outputs to the val shards' categories through the checkpoint's
label map: torchvision's 91-output COCO model evaluates on shards whose categories carry
COCO ids and names, with the same detections under the same ids as torchvision's own
inference; a model that does not cover the data is refused in one line."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision
from evaluation_helpers import REPO, one_line

from pipeline.config import load_config
from pipeline.data import build_val_loader, read_manifest
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.distributed import DistInfo
from pipeline.evaluation import CheckpointError, evaluate_checkpoint
from pipeline.evaluation.runner import load_model_everywhere
from pipeline.modeling import MaskRCNN

SIZE = 96
# The shapes as COCO categories: (shapes id) -> (COCO id, COCO name).
AS_COCO = {1: (37, "sports ball"), 2: (62, "chair"), 3: (13, "stop sign")}
# Biased outputs: the dataset's three, and person, which the dataset lacks. The random
# weights favour some classes; these biases let each of the four reach the top 100.
BIASED = {37: 6.0, 62: 7.0, 13: 6.0, 1: 6.6}


def coco_named_shards(root: Path, mapping: dict, images: int = 6) -> Path:
    """A shapes val set whose categories are ``mapping``'s (id, name), in shards."""
    make_shapes_dataset(root, 0, images, SIZE, seed=11)
    path = root / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [
        {"id": mapping[c["id"]][0], "name": mapping[c["id"]][1]} for c in coco["categories"]
    ]
    for annotation in coco["annotations"]:
        annotation["category_id"] = mapping[annotation["category_id"]][0]
    path.write_text(json.dumps(coco))
    out = root / "shards"
    build_shards(path, root / "images" / "val", out, shard_size=4, progress=False)
    return out


def convert(raw: Path, out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("convert", REPO / "launch/convert_torchvision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.convert(raw, out)
    return out


def config(shards: Path, *overrides: str):
    return load_config(
        None,
        [f"data.val_shards={shards}", f"input.min_size_test={SIZE}", f"input.max_size_test={SIZE}",
         "data.num_workers=0", "eval.batch_size=2", "eval.num_pictures=1",
         "tracking.enabled=false", *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def biased_coco_model(tmp_path_factory):
    """torchvision's maskrcnn_resnet50_fpn with COCO's 91 outputs, random weights, its
    classifier biased towards ``BIASED`` so that its detections carry those ids; and the
    converted file."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=SIZE, max_size=SIZE
    ).eval()
    with torch.no_grad():  # the bias decides the class, the weights still vary the scores
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.2)
        model.roi_heads.box_predictor.cls_score.bias[list(BIASED)] += torch.tensor(
            list(BIASED.values())
        )
    work = tmp_path_factory.mktemp("coco_model")
    torch.save(model.state_dict(), work / "torchvision.pth")
    return model, convert(work / "torchvision.pth", work / "converted.pt")


def test_torchvision_coco_model_evaluates_under_coco_ids(tmp_path, biased_coco_model):
    torchvision_model, converted = biased_coco_model
    shards = coco_named_shards(tmp_path / "data", AS_COCO)
    cfg = config(shards)
    report = evaluate_checkpoint(cfg, converted, tmp_path / "out", DistInfo())
    assert report.metrics["images_evaluated"] == 6
    ours = json.loads((tmp_path / "out" / "bbox.json").read_text())

    # torchvision's own inference on the same images (the loader's tensors, at their size).
    expected = []
    with torch.inference_mode():
        for images, targets in build_val_loader(cfg, 0, 1):
            found_all = torchvision_model(list(images))
            for target, found in zip(targets, found_all, strict=True):
                found_triples = zip(found["boxes"], found["labels"], found["scores"], strict=True)
                for box, label, score in found_triples:
                    if int(label) in {coco_id for coco_id, _ in AS_COCO.values()}:
                        x1, y1, x2, y2 = box.tolist()
                        expected.append((int(target["image_id"]), int(label), float(score),
                                         [x1, y1, x2 - x1, y2 - y1]))  # fmt: skip
    # Person (1) was among the biased outputs but is not in the dataset: never reported.
    assert {entry["category_id"] for entry in ours} <= {13, 37, 62}
    assert any(label == 1 for found in torchvision_model([images[0]]) for label in found["labels"])
    assert len({label for _, label, _, _ in expected}) == 3  # all three ids were detected
    assert len(ours) == len(expected) > 20
    remaining = list(ours)
    for image_id, label, score, box in expected:
        found = next(
            (
                entry
                for entry in remaining
                if entry["image_id"] == image_id
                and entry["category_id"] == label
                and abs(entry["score"] - score) < 1e-4
                and max(abs(a - b) for a, b in zip(entry["bbox"], box, strict=True)) < 1e-2
            ),
            None,
        )
        assert found is not None, (image_id, label, score, box)
        remaining.remove(found)
    print(f"{len(expected)} torchvision detections found under the same ids by our evaluation")


def test_a_model_that_does_not_cover_the_data_is_refused_in_one_line(tmp_path, biased_coco_model):
    _, converted = biased_coco_model
    # The shapes' own categories: circle (1), square (2), triangle (3), none of them COCO's.
    shards = coco_named_shards(tmp_path / "data", {1: (1, "circle"), 2: (2, "square"),
                                                   3: (5, "sports ball")})  # fmt: skip
    cfg = config(shards)
    manifest = read_manifest(shards)
    with pytest.raises(CheckpointError) as error:
        load_model_everywhere(cfg, converted, DistInfo(), manifest)
    line = one_line(error)
    assert f"checkpoint {converted}: its categories do not cover data.val_shards" in line
    assert "2 of 3 missing: 'circle' (id 1, the model's 'person'), 'square' (id 2, " in line
    assert "the model knows 80 categories: person (1), bicycle (2)" in line


def test_our_checkpoint_evaluates_on_a_dataset_with_other_ids(tmp_path):
    """A model trained on shards numbered one way evaluates on the same categories
    numbered another way: the detections come out under the second dataset's ids."""
    torch.manual_seed(0)
    model = MaskRCNN(num_classes=4, depth=18, fpn_channels=32, min_size_test=SIZE,
                     max_size_test=SIZE, detections_per_image=20).eval()  # fmt: skip
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1:] += 4.0
    trained_on = [{"index": 1, "id": 1, "name": "circle"}, {"index": 2, "id": 2, "name": "square"},
                  {"index": 3, "id": 3, "name": "triangle"}]  # fmt: skip
    model.save_checkpoint(tmp_path / "model.pt", label_map=trained_on)
    renumbered = {1: (30, "circle"), 2: (10, "square"), 3: (20, "triangle")}
    same = evaluate_checkpoint(
        config(coco_named_shards(tmp_path / "a", {k: (k, n) for k, (_, n) in renumbered.items()})),
        tmp_path / "model.pt", tmp_path / "same", DistInfo(),
    )  # fmt: skip
    other = evaluate_checkpoint(
        config(coco_named_shards(tmp_path / "b", renumbered)),
        tmp_path / "model.pt", tmp_path / "other", DistInfo(),
    )  # fmt: skip
    first = json.loads((tmp_path / "same" / "bbox.json").read_text())
    second = json.loads((tmp_path / "other" / "bbox.json").read_text())
    assert len(first) == len(second) > 0
    new_id = {k: renumbered[k][0] for k in renumbered}
    assert [new_id[e["category_id"]] for e in first] == [e["category_id"] for e in second]
    for iou_type in ("bbox", "segm"):  # the same AP: the same detections, renumbered
        assert same.metrics[f"{iou_type}/AP"] == other.metrics[f"{iou_type}/AP"]
    # The legacy path: a checkpoint without a map but with the data's class count is taken
    # in the data's order; with another count it is refused, naming both.
    torch.save(model.checkpoint(), tmp_path / "legacy.pt")
    shards = tmp_path / "b" / "shards"
    legacy = evaluate_checkpoint(config(shards), tmp_path / "legacy.pt", tmp_path / "l", DistInfo())
    assert legacy.metrics["images_evaluated"] == 6
    MaskRCNN(num_classes=5, depth=18, fpn_channels=32).save_checkpoint(tmp_path / "five.pt")
    with pytest.raises(CheckpointError) as error:
        evaluate_checkpoint(config(shards), tmp_path / "five.pt", tmp_path / "f", DistInfo())
    assert "num_classes=5 and records no label map, data.val_shards" in one_line(error)
    assert "needs 4 (3 categories + background)" in one_line(error)
