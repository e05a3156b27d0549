"""Fixed-size forms of the data-dependent selections of Mask R-CNN (issue #26).

On a GPU the host waits for the device wherever a tensor's size depends on its values (an index
list from ``nonzero`` or NMS, boolean-mask indexing, ``.item()``). Here such selections keep a
size known on the host, padded, with a validity mask beside them: NMS gives a keep mask
(``ops.nms_keep_mask``) from which :func:`top_kept` takes the best boxes by a masked sort, and
:func:`compact` moves the marked entries of each row to its front.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

import ops


class Proposals(NamedTuple):
    """The RPN's proposals of a batch: ``boxes`` [N, P, 4] and ``valid`` [N, P] (padding
    False). Valid proposals come first in each row, by decreasing objectness."""

    boxes: Tensor
    valid: Tensor


def as_proposals(proposals: Proposals | list[Tensor]) -> Proposals:
    """``proposals`` as :class:`Proposals`; a list of per-image [P_i, 4] boxes is padded
    (their sizes are known on the host: no synchronisation)."""
    if isinstance(proposals, Proposals):
        return proposals
    size = max((p.shape[0] for p in proposals), default=0)
    boxes = proposals[0].new_zeros((len(proposals), size, 4))
    valid = torch.zeros((len(proposals), size), dtype=torch.bool, device=boxes.device)
    for image, p in enumerate(proposals):
        boxes[image, : p.shape[0]] = p
        valid[image, : p.shape[0]] = True
    return Proposals(boxes, valid)


def nms_keep_per_image(
    boxes: Tensor, scores: Tensor, iou_threshold: float, classes: Tensor
) -> Tensor:
    """Batched NMS of each image on its own: ``boxes`` [N, M, 4], ``scores`` [N, M], ``classes``
    [N, M] (negative: padding, never kept) -> keep mask [N, M]. One fixed-size NMS per image,
    not one over the whole batch: the CUDA kernel's suppression bitmask is quadratic in its
    input (80,000 RPN boxes of 8 training images would be an 800 MB mask and 8x the IoUs of
    per-image calls), and no sync is added either way."""
    keep = [
        ops.nms_keep_mask(b, s, iou_threshold, c)
        for b, s, c in zip(boxes, scores, classes, strict=True)
    ]
    return torch.stack(keep) if keep else scores.new_zeros(scores.shape, dtype=torch.bool)


def top_kept(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best kept entries of each row of ``scores`` [N, M] (``keep`` [N, M] bool):
    ``order`` [N, min(k, M)] by decreasing score, equal scores by increasing index (the order of
    the index-list NMS), and ``valid`` [N, min(k, M)], False past a row's kept entries. A masked
    sort: the unkept entries sort below every score."""
    k = min(k, scores.shape[-1])
    masked = torch.where(keep, scores, float("-inf"))
    order = masked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return order, keep.gather(-1, order)


def compact(mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Indices [N, size] of the True entries of each row of ``mask`` [N, M], in increasing
    order, padded with 0, and their validity [N, size]; rows with more than ``size`` True
    entries keep their first ``size``. A scatter by running count: O(M), no sort, no sync."""
    rows, length = mask.shape
    rank = mask.cumsum(dim=1) - 1
    slot = torch.where(mask & (rank < size), rank, size)
    positions = torch.arange(length, device=mask.device).expand(rows, length)
    out = torch.zeros((rows, size + 1), dtype=torch.int64, device=mask.device)
    out.scatter_(1, slot, positions)  # the spare column collects the rest
    valid = torch.arange(size, device=mask.device)[None, :] < mask.sum(dim=1, keepdim=True)
    return out[:, :size], valid
