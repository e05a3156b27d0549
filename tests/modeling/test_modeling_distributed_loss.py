"""Focal-loss normalizers averaged across ranks: two gloo processes with one image each give,
averaged as DDP averages them, the gradients of one process with both images."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from modeling_helpers import tiny_batch

from pipeline.modeling import MaskRCNN, average_across_ranks

IMAGE = 128
STRIDES = (4, 8, 16, 32, 64)


def make_model() -> MaskRCNN:
    """Focal RPN objectness and box classifier; samplers that take every candidate, so the
    samples do not depend on the random permutations."""
    torch.manual_seed(0)
    return MaskRCNN(
        num_classes=4,
        depth=18,
        fpn_channels=32,
        anchor_sizes=[16, 32, 64, 128, 256],
        rpn_batch_size_per_image=10**6,
        rpn_positive_fraction=1.0,
        roi_batch_size_per_image=10**6,
        roi_positive_fraction=1.0,
        rpn_objectness_loss="focal",
        classifier_loss="focal",
        box_head_dim=64,
        mask_head_channels=32,
    ).train()


def inputs():
    """Fixed FPN features, proposals and targets of two images with 2 and 1 objects."""
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 32, IMAGE // s, IMAGE // s, generator=generator) for s in STRIDES]
    _, targets = tiny_batch(IMAGE, 2)
    proposals = []
    for target in targets:
        jitter = torch.randn(8, len(target["boxes"]), 4, generator=generator) * 6
        boxes = (target["boxes"][None] + jitter).reshape(-1, 4)
        xy = torch.rand(24, 2, generator=generator) * 90
        extra = torch.cat([xy, xy + 10 + torch.rand(24, 2, generator=generator) * 30], 1)
        boxes = torch.cat([boxes, extra]).clamp(0, IMAGE)
        x1y1 = torch.minimum(boxes[:, :2], boxes[:, 2:] - 2)
        proposals.append(torch.cat([x1y1, boxes[:, 2:]], 1))
    return features, proposals, targets


def focal_gradients(model: MaskRCNN, images: list[int]) -> dict[str, torch.Tensor]:
    """Gradients of loss_objectness + loss_classifier over the RPN and the RoI heads for the
    images of index ``images``."""
    features, proposals, targets = inputs()
    features = [f[images] for f in features]
    proposals = [proposals[i] for i in images]
    targets = [targets[i] for i in images]
    sizes = [(IMAGE, IMAGE)] * len(images)
    model.zero_grad()
    _, rpn_losses = model.rpn(features, (IMAGE, IMAGE), sizes, targets)
    _, roi_losses = model.roi_heads(features[:4], proposals, sizes, targets)
    (rpn_losses["loss_objectness"] + roi_losses["loss_classifier"]).backward()
    return {
        name: param.grad.clone()
        for name, param in model.named_parameters()
        if param.grad is not None and name.startswith(("rpn.", "roi_heads."))
    }


def _worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2
    )
    try:
        assert average_across_ranks(float(rank + 1)) == 1.5
        torch.save(focal_gradients(make_model(), [rank]), os.path.join(directory, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    single = focal_gradients(make_model(), [0, 1])
    assert "roi_heads.box_predictor.cls_score.weight" in single
    assert "rpn.head.objectness.weight" in single
    for name, expected in single.items():
        averaged = (ranks[0][name] + ranks[1][name]) / 2  # what DDP's all-reduce gives
        torch.testing.assert_close(averaged, expected, rtol=1e-4, atol=1e-7, msg=name)
    # With per-rank normalizers (one process per image, no process group) it would not match:
    # the images have different numbers of positives.
    local = [focal_gradients(make_model(), [i]) for i in range(2)]
    weight = "roi_heads.box_predictor.cls_score.weight"
    naive = (local[0][weight] + local[1][weight]) / 2
    assert not torch.allclose(naive, single[weight], rtol=1e-3, atol=1e-6)


def test_average_without_process_group_is_the_value():
    assert not dist.is_initialized()
    assert average_across_ranks(3) == 3.0
