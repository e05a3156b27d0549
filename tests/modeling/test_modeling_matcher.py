"""The chunked IoU matcher: equal to the unchunked one, bounded memory with 500 objects."""

from __future__ import annotations

import pytest
import torch
from modeling_helpers import synthetic_batch
from test_modeling_training import small_config

import pipeline.modeling.boxes as boxes_module
from pipeline.modeling import build_model
from pipeline.modeling.boxes import ProposalMatcher, box_iou
from pipeline.modeling.rpn import AnchorGenerator


def random_boxes(n, size, generator, max_side=80.0):
    xy = torch.rand(n, 2, generator=generator) * (size - max_side)
    wh = torch.rand(n, 2, generator=generator) * max_side + 2
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("low_quality", [True, False])
def test_chunked_matches_unchunked(low_quality):
    generator = torch.Generator().manual_seed(0)
    gt = random_boxes(37, 512, generator)
    candidates = random_boxes(5000, 512, generator)
    candidates[100:110] = gt[:10]  # exact hits: IoU 1 ties
    unchunked = ProposalMatcher(0.7, 0.3, low_quality, max_chunk_elements=1 << 30)(gt, candidates)
    chunked = ProposalMatcher(0.7, 0.3, low_quality, max_chunk_elements=37 * 100 + 5)(
        gt, candidates
    )
    assert torch.equal(chunked, unchunked)
    # And the unchunked result is torchvision's Matcher's.
    from torchvision.models.detection._utils import Matcher

    reference = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(box_iou(gt, candidates))
    assert torch.equal(unchunked, reference)
    assert (unchunked >= 0).any() and (unchunked == -1).any() and (unchunked == -2).any()


def test_500_objects_bounded_iou_chunks(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    height, width = 800, 1088
    anchors = AnchorGenerator(sizes=[32, 64, 128, 256, 512], aspect_ratios=[0.5, 1.0, 2.0])(
        (height, width), [(height // s, width // s) for s in (4, 8, 16, 32)] + [(13, 17)]
    )
    gt = random_boxes(500, 800, generator)
    largest = []

    def recording_box_iou(a, b):
        largest.append(a.shape[0] * b.shape[0])
        return box_iou(a, b)

    monkeypatch.setattr(boxes_module, "box_iou", recording_box_iou)
    matcher = ProposalMatcher(0.7, 0.3, True, max_chunk_elements=1 << 21)
    matches = matcher(gt, anchors)
    assert anchors.shape[0] > 200_000
    # The full matrix would hold 500 x 217k IoUs (and box_iou several temporaries of that).
    assert max(largest) <= 1 << 21
    assert matches.shape == (anchors.shape[0],)
    # Most objects get anchors (low-quality matches keep torchvision's argmax quirk, so an
    # object's best anchor can go to a neighbour it overlaps less than).
    assert torch.unique(matches[matches >= 0]).numel() > 400
    # Same as unchunked on a slice of the anchors (the full matrix is what we avoid).
    some = anchors[::40]
    unchunked = ProposalMatcher(0.7, 0.3, True, max_chunk_elements=1 << 30)(gt, some)
    assert torch.equal(matcher(gt, some), unchunked)


def test_training_step_with_500_objects():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    model = build_model(small_config()).train()
    height, width = 160, 192
    boxes = random_boxes(500, 160, generator, max_side=30.0)
    masks = torch.zeros(500, height, width, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        masks[i, y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.randint(1, 4, (500,), generator=generator)}
    target["masks"] = masks
    first, _, _ = synthetic_batch()
    losses = model(
        [torch.rand(3, height, width, generator=generator), first[0]], [target, first[1]]
    )
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
