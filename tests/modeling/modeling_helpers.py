"""Shared helpers of the model tests: a torchvision Mask R-CNN whose random weights give many
detections, smooth test images, a detection-by-detection comparison and a synthetic batch.
(A uniquely named module, not conftest.py: tests/data imports its own ``conftest``.)"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

torch.set_num_threads(min(2, torch.get_num_threads()))


# The five losses Mask R-CNN returns in training.
LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def make_torchvision_maskrcnn(
    num_classes: int = 91, seed: int = 0, min_size: int = 256, max_size: int = 320
) -> torch.nn.Module:
    """torchvision's maskrcnn_resnet50_fpn, seeded random init, in eval mode.

    BatchNorm statistics are randomised (so folding them into the convolutions is exercised)
    and the box classifier is scaled so that many proposals pass the 0.05 score threshold with
    well-separated scores and varied labels: a plain random init gives almost no detections.
    """
    torch.manual_seed(seed)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.mul_(30.0)
        predictor.cls_score.bias[1 : min(6, num_classes)] += 4.0
        predictor.bbox_pred.weight.mul_(5.0)
    return model.eval()


def smooth_images(sizes: list[tuple[int, int]], seed: int = 1) -> list[torch.Tensor]:
    """[3, H, W] 0-1 images of low-frequency noise (upsampled), one per size."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sizes:
        coarse = torch.rand(1, 3, max(1, height // 8), max(1, width // 8), generator=generator)
        images.append(
            torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
        )
    return images


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-detection IoU of binarised [N, 1, H, W] masks (1 where both are empty)."""
    a, b = a[:, 0] > threshold, b[:, 0] > threshold
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def assert_same_detections(
    expected: dict[str, torch.Tensor],
    actual: dict[str, torch.Tensor],
    min_count: int = 20,
    box_tol: float = 1e-3,
    score_tol: float = 1e-5,
    min_mask_iou: float = 0.99,
    max_unpaired_fraction: float = 0.03,
) -> None:
    """Same detections up to the order of (near-)equal scores.

    Each expected detection is paired with the actual one of the same label with the closest
    box; pairs must agree within the tolerances. Last-bit differences of the (fused,
    channels_last) convolutions can flip near-ties at a cut-off (the RPN top-k, the
    detections-per-image cap), swapping a detection for another of almost equal score, so up to
    ``max_unpaired_fraction`` of them may go unpaired.
    """
    count = len(expected["boxes"])
    assert count >= min_count, f"only {count} detections: the test would compare too little"
    allowed = int(max_unpaired_fraction * count)
    assert abs(len(actual["boxes"]) - count) <= allowed
    distance = (expected["boxes"][:, None] - actual["boxes"][None]).abs().amax(-1)
    distance[expected["labels"][:, None] != actual["labels"][None]] = float("inf")
    nearest, pairing = distance.min(1)
    paired = nearest <= box_tol
    assert (~paired).sum() <= allowed, f"{int((~paired).sum())} of {count} unpaired"
    assert pairing[paired].unique().numel() == int(paired.sum()), "two detections pair with one"
    index = pairing[paired]
    torch.testing.assert_close(
        actual["scores"][index], expected["scores"][paired], atol=score_tol, rtol=0
    )
    assert actual["masks"].shape[1:] == expected["masks"].shape[1:]
    assert mask_iou(expected["masks"][paired], actual["masks"][index]).min() > min_mask_iou


def synthetic_batch():
    """Two small images with rectangles of classes 1..3, their targets, and an empty image."""

    def make(height, width, boxes, labels):
        image = torch.full((3, height, width), 0.2)
        masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
        for i, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels, strict=True)):
            masks[i, y1:y2, x1:x2] = 1
            image[label - 1, y1:y2, x1:x2] = 0.9
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": masks,
        }
        return image, target

    first = make(160, 192, [(10, 20, 70, 90), (100, 40, 170, 120)], [1, 2])
    second = make(160, 160, [(30, 30, 120, 100)], [3])
    empty = make(160, 176, [], [])
    return first, second, empty


def tiny_config(**model_overrides):
    """The shapes_r18_cpu config shrunk for fast tests: ResNet-18, 32-channel FPN and heads,
    128-pixel images. ``model_overrides`` are dotted keys under ``model`` (``backbone.norm``)."""
    from pipeline.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs/shapes_r18_cpu.yaml"))
    cfg.model.backbone.fpn_channels = 32
    cfg.model.roi_heads.mask_head_channels = 32
    cfg.model.roi_heads.box_head_dim = 64
    cfg.model.roi_heads.batch_size_per_image = 64
    cfg.model.rpn.batch_size_per_image = 64
    cfg.model.rpn.pre_nms_top_n_train = 300
    cfg.model.rpn.post_nms_top_n_train = 100
    cfg.input.min_size_train = [128]
    cfg.input.max_size_train = 128
    cfg.input.min_size_test = 128
    cfg.input.max_size_test = 128
    for key, value in model_overrides.items():
        *path, name = key.split(".")
        node = cfg.model
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return cfg


def tiny_batch(size: int = 128, num_images: int = 2):
    """``num_images`` size x size images with 1..3 rectangles of classes 1..3, and targets."""
    layouts = [
        [((8, 12, 60, 70), 1), ((70, 30, 120, 100), 2)],
        [((20, 20, 90, 80), 3)],
        [((5, 5, 40, 50), 2), ((50, 60, 110, 120), 1), ((80, 10, 120, 40), 3)],
    ]
    images, targets = [], []
    for index in range(num_images):
        image = torch.full((3, size, size), 0.2)
        layout = layouts[index % len(layouts)]
        masks = torch.zeros(len(layout), size, size, dtype=torch.uint8)
        for i, ((x1, y1, x2, y2), label) in enumerate(layout):
            masks[i, y1:y2, x1:x2] = 1
            image[label - 1, y1:y2, x1:x2] = 0.9
        images.append(image)
        targets.append(
            {
                "boxes": torch.tensor([box for box, _ in layout], dtype=torch.float32),
                "labels": torch.tensor([label for _, label in layout], dtype=torch.int64),
                "masks": masks,
            }
        )
    return images, targets
