"""Loss functions of the RPN and the RoI heads."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.collectives import mean_across_ranks, mean_tensor_across_ranks

BoxLoss = Literal["smooth_l1", "l1"]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str = "sum"
) -> Tensor:
    """Sigmoid focal loss (Lin et al., RetinaNet): ``alpha_t * (1 - p_t)**gamma * BCE``.

    ``targets`` are 0/1 floats of ``logits``' shape; a negative ``alpha`` disables the
    class weighting. ``reduction`` is "none", "sum" or "mean".
    """
    probs = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def box_regression_loss(pred: Tensor, target: Tensor, kind: BoxLoss, beta: float) -> Tensor:
    """Summed smooth-L1 (with ``beta``) or L1 loss; the caller normalises."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    raise ValueError(f"unknown box loss {kind!r}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` (0 without any), its count a device tensor: no host
    read."""
    return (values * mask).sum() / mask.sum().clamp(min=1).to(values.dtype)


# A logit whose sigmoid focal loss against target 0 is exactly 0 in float32 and float64 (sigmoid
# and the BCE underflow to 0): padding slots take it, so a "sum" over fixed-size slots is the sum
# over the sampled ones.
PADDING_LOGIT = -1.0e4


def average_across_ranks(value: float | Tensor) -> float | Tensor:
    """``value`` averaged over the ranks of the default process group (itself without one).

    A loss normalised by a count (e.g. the focal loss by its positives) and averaged by DDP
    over ranks is then ``sum over ranks of the summed losses / global count``: the same
    gradient whatever the split of the global batch into per-rank batches (detectron2's
    ``all_reduce(num_pos) / world_size``). Every rank must call this at the same point of
    its forward pass. A tensor stays a tensor on its device (no host read).
    """
    if isinstance(value, Tensor):
        return mean_tensor_across_ranks(value.detach())
    return mean_across_ranks(float(value))
