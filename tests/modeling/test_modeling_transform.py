"""Input handling against torchvision's GeneralizedRCNNTransform, and the training
pass-through of images the data loader already resized."""

from __future__ import annotations

import torch
from modeling_helpers import smooth_images
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pipeline.modeling.transform import ImagePreprocessor, resized_shape

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make(min_train=(256,), max_train=320, min_test=256, max_test=320):
    return ImagePreprocessor(
        min_size_train=min_train,
        max_size_train=max_train,
        min_size_test=min_test,
        max_size_test=max_test,
        pixel_mean=MEAN,
        pixel_std=STD,
    )


def test_eval_batch_equals_torchvision():
    images = smooth_images([(240, 320), (300, 200), (401, 299), (100, 90)])
    ours = make().eval()
    reference = GeneralizedRCNNTransform(256, 320, MEAN, STD).eval()
    batch, sizes, _ = ours(images)
    expected, _ = reference(images)
    assert sizes == [tuple(s) for s in expected.image_sizes]
    assert torch.equal(batch, expected.tensors)
    assert batch.shape[-1] % 32 == 0 and batch.shape[-2] % 32 == 0


def test_training_passes_resized_images_through():
    preprocessor = make(min_train=(192, 224, 256), max_train=320).train()
    height, width = resized_shape(480, 640, 224, 320)  # what the loader makes of a 480x640
    image = smooth_images([(height, width)])[0]
    target = {
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, height, width, dtype=torch.uint8),
    }
    for _ in range(5):  # whatever size is drawn, the image stays as it is
        batch, sizes, targets = preprocessor([image], [target])
        assert sizes == [(height, width)]
        normalised = (image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        assert torch.equal(batch[0, :, :height, :width], normalised)
        assert torch.equal(targets[0]["boxes"], target["boxes"])
        assert targets[0]["masks"].shape == (1, height, width)


def test_training_resizes_other_images_and_targets():
    preprocessor = make(min_train=(256,), max_train=320).train()
    image = smooth_images([(120, 150)])[0]
    target = {
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.zeros(1, 120, 150, dtype=torch.uint8),
    }
    _, sizes, targets = preprocessor([image], [target])
    assert sizes == [resized_shape(120, 150, 256, 320)] == [(256, 320)]
    torch.testing.assert_close(
        targets[0]["boxes"], torch.tensor([[10.0, 20.0, 50.0, 60.0]]) * 256 / 120
    )
    assert targets[0]["masks"].shape == (1, 256, 320)
