"""Non-maximum suppression, plain and per class."""

import torch
from torch import Tensor

from . import reference
from ._extension import use_reference

__all__ = ["batched_nms", "nms", "nms_keep_mask"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: drop every box whose IoU with a higher-scoring kept box exceeds the threshold.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2); scores: [N], same dtype (float32/float64, or
            float16/bfloat16, compared in float32; under autocast both run in float32).

    Returns:
        int64 indices of the kept boxes by decreasing score; equal scores keep increasing index
        order. Identical to ``torchvision.ops.nms`` on the CPU.
    """
    if use_reference(boxes):
        return reference.nms(boxes, scores, iou_threshold)
    return torch.ops.maskrcnn_ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs`` (boxes of different categories never suppress each other).

    One pass over all boxes at any count, without a per-class loop: on the CPU the boxes are
    grouped by class and the classes run in parallel; on CUDA the suppression mask skips pairs of
    different classes. That is the coordinate-offset trick's effect without the offset, which loses
    float precision on large coordinates. Returns what ``torchvision.ops.batched_nms`` does, equal
    scores in the same order too. Empty ``boxes`` give an empty int64 tensor whatever the other
    arguments (None too), as torchvision's does.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if use_reference(boxes):
        keep = reference.batched_nms(boxes, scores, idxs, iou_threshold)
    else:
        keep = torch.ops.maskrcnn_ops.batched_nms(boxes, scores, idxs, float(iou_threshold))
    return _torchvision_tie_order(keep, boxes, scores)


def _torchvision_tie_order(keep: Tensor, boxes: Tensor, scores: Tensor) -> Tensor:
    """Reorders equal scores the way torchvision.ops.batched_nms returns them.

    ``keep`` lists equal scores by increasing index, as torchvision's nms (and so its coordinate
    trick path) does. Above 4,000 coordinates on the CPU (100,000 on CUDA) torchvision loops over
    the classes instead and orders the kept indices with an unstable sort; the same call on the
    same input reproduces its order exactly. It costs two sorts of the kept boxes.
    """
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        return keep
    by_index = keep.sort().values
    return by_index[scores[by_index].sort(descending=True)[1]]


def nms_keep_mask(
    boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None
) -> Tensor:
    """Fixed-size NMS: a bool [N] mask, True for the boxes :func:`nms` (``idxs`` None) or
    :func:`batched_nms` keeps. Its size does not depend on the data, so on a GPU the host does not
    wait for the result (the index-list forms read their length). Boxes whose ``idxs`` are
    negative are padding: never kept, and they suppress nothing (on the CPU they cost no IoUs).
    """
    if use_reference(boxes):
        mask = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if boxes.shape[0] == 0:
            return mask
        if idxs is None:
            return mask.index_fill_(0, reference.nms(boxes, scores, iou_threshold), True)
        candidates = torch.where(idxs >= 0)[0]
        kept = reference.batched_nms(
            boxes[candidates], scores[candidates], idxs[candidates], iou_threshold
        )
        return mask.index_fill_(0, candidates[kept], True)
    return torch.ops.maskrcnn_ops.nms_keep_mask(boxes, scores, float(iou_threshold), idxs)
