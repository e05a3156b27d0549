"""Loss functions of the RPN and the RoI heads."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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
