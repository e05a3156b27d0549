"""Vectorised mask pasting against torchvision's per-mask loop."""

from __future__ import annotations

import torch
from modeling_helpers import mask_iou
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste

from pipeline.modeling import paste_masks_in_image


def test_paste_matches_torchvision():
    generator = torch.Generator().manual_seed(0)
    height, width, count = 240, 320, 60
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.95
    wh = torch.rand(count, 2, generator=generator) * 150 + 0.5
    boxes = torch.cat([xy, torch.min(xy + wh, torch.tensor([width, height]).float())], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # whole image
    boxes[1] = torch.tensor([10.0, 10.0, 10.4, 10.3])  # sub-pixel
    masks = torch.rand(count, 1, 28, 28, generator=generator)
    expected = torchvision_paste(masks, boxes, (height, width))
    actual = paste_masks_in_image(masks, boxes, (height, width))
    assert actual.shape == (count, 1, height, width)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert mask_iou(expected, actual).min() > 0.99
    # Chunked under a small memory bound: the same.
    chunked = paste_masks_in_image(masks, boxes, (height, width), max_chunk_bytes=1 << 20)
    torch.testing.assert_close(chunked, actual, atol=1e-6, rtol=0)


def test_paste_no_masks_and_boxes_past_the_border():
    assert paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 60)).shape == (
        0,
        1,
        50,
        60,
    )
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[-20.0, -10.0, 30.0, 25.0], [40.0, 30.0, 90.0, 80.0]])
    pasted = paste_masks_in_image(masks, boxes, (50, 60))
    assert pasted[0, 0, :25, :30].min() > 0.5 and pasted[0, 0, 28:, 33:].max() == 0
    assert pasted[1, 0, 31:, 41:].min() > 0.5 and pasted[1, 0, :29, :].max() == 0
