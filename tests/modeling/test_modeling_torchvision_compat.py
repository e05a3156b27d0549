"""Our model with torchvision weights gives torchvision's detections."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import assert_same_detections, make_torchvision_maskrcnn, smooth_images

from pipeline.modeling import MaskRCNN

# Upscaled, untouched and downscaled by the 256/320 resize rule.
SIZES = [(240, 320), (300, 200), (400, 300)]


@pytest.mark.parametrize("num_classes", [91, 7])
def test_from_torchvision_matches_torchvision(num_classes):
    reference = make_torchvision_maskrcnn(num_classes=num_classes, seed=num_classes)
    model = MaskRCNN.from_torchvision(
        reference.state_dict(), min_size_test=256, max_size_test=320
    ).eval()
    assert model.roi_heads.num_classes == num_classes
    images = smooth_images(SIZES, seed=num_classes)
    with torch.no_grad():
        expected = reference(images)
        actual = model(images)
    for exp, act, image in zip(expected, actual, images, strict=True):
        assert act["masks"].shape[-2:] == image.shape[-2:]
        assert_same_detections(exp, act)


def test_converted_keys_cover_the_model():
    reference = make_torchvision_maskrcnn(num_classes=5)
    converted = MaskRCNN.convert_torchvision_state_dict(reference.state_dict())
    model = MaskRCNN(**MaskRCNN.torchvision_model_args(reference.state_dict()))
    assert set(converted) == set(model.state_dict())
