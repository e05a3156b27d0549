"""Inference: the model's detections mapped to the original image size, and COCO results."""

import numpy as np
import pytest
import torch
from evaluation_helpers import tiny_model
from pycocotools import mask as mask_utils

from pipeline.evaluation.inference import (
    ModelPredictor,
    coco_results,
    detect,
    encode_masks,
    to_original,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=1)
    with torch.no_grad():  # a classifier that lets many proposals through, varied labels
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    return model


def test_detect_at_input_size_is_the_models_own_output(model):
    images = [torch.rand(3, 72, 90), torch.rand(3, 80, 72)]
    with torch.inference_mode():
        expected = model(images)
    ours = detect(model, images, [(72, 90), (80, 72)])
    assert sum(len(d["boxes"]) for d in expected) > 0
    for a, b in zip(ours, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_detect_pastes_at_the_original_size(model):
    image = torch.rand(3, 72, 90)
    small = detect(model, [image], [(72, 90)])[0]
    large = detect(model, [image], [(144, 135)])[0]  # 2x in height, 1.5x in width
    assert large["masks"].shape[-2:] == (144, 135)
    ratios = torch.tensor([1.5, 2.0, 1.5, 2.0])
    assert torch.allclose(large["boxes"], small["boxes"] * ratios, atol=1e-4)
    assert torch.equal(large["scores"], small["scores"])


def test_the_predictor_thresholds_masks_before_they_leave_the_device(model):
    images, sizes = [torch.rand(3, 72, 90)], [(144, 135)]
    probabilities = detect(model, images, sizes)[0]
    predicted = ModelPredictor(model, torch.device("cpu"), mask_threshold=0.5)(images, sizes)[0]
    # Booleans cross to the host (a quarter of float32's bytes), not the probabilities ...
    assert predicted["masks"].dtype == torch.bool
    assert torch.equal(predicted["masks"], probabilities["masks"] > 0.5)
    # ... and the COCO results are those of the probabilities.
    common = dict(contiguous_to_coco={i: i for i in range(10)}, mask_threshold=0.5,
                  iou_types=("bbox", "segm"))  # fmt: skip
    (ours, ours_binary), (theirs, binary) = (
        coco_results(d, 1, **common) for d in (predicted, probabilities)
    )
    assert ours == theirs and ours["segm"] and torch.equal(ours_binary, binary)


def test_to_original_scales_each_axis():
    detection = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.9]),
        "masks": torch.ones(1, 1, 28, 28),
    }
    (mapped,) = to_original([detection], [(100, 50)], [(200, 25)])
    assert mapped["boxes"].tolist() == [[5.0, 40.0, 15.0, 120.0]]
    assert mapped["masks"].shape == (1, 1, 200, 25)
    inside = mapped["masks"][0, 0, 42:118, 6:14]
    assert inside.min() > 0.5 and mapped["masks"][0, 0, :30].max() == 0


def test_coco_results_are_xywh_with_dataset_ids_and_decodable_rles():
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:7] = 0.9
    masks[1, 0, 4:, :2] = 0.6
    masks[1, 0, 0, 0] = 0.4  # below the threshold
    detection = {
        "boxes": torch.tensor([[2.0, 1.0, 7.0, 3.0], [0.0, 4.0, 2.0, 6.0]]),
        "labels": torch.tensor([1, 3]),
        "scores": torch.tensor([0.8, 0.3]),
        "masks": masks,
    }
    results, binary = coco_results(
        detection, 7, contiguous_to_coco={1: 11, 2: 12, 3: 13}, mask_threshold=0.5,
        iou_types=("bbox", "segm"),
    )  # fmt: skip
    assert [r["category_id"] for r in results["bbox"]] == [11, 13]
    assert results["bbox"][0]["bbox"] == [2.0, 1.0, 5.0, 2.0]
    assert results["bbox"][1]["score"] == pytest.approx(0.3)
    for entry, expected in zip(results["segm"], binary, strict=True):
        assert isinstance(entry["segmentation"]["counts"], str)
        decoded = mask_utils.decode(
            {**entry["segmentation"], "counts": entry["segmentation"]["counts"].encode()}
        )
        assert np.array_equal(decoded, expected.numpy())
    assert binary[1].sum() == 4 and encode_masks(binary[:0]) == []
