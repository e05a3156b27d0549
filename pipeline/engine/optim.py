"""The optimizer and the learning-rate schedule of the train stage.

SGD with momentum as in detectron2 and torchvision's references: no weight decay on norm
weights and biases (decaying a GroupNorm or BatchNorm scale towards zero only fights the
normalization), a linear warm-up, then multi-step or cosine decay. The learning rate of the
config is meant for ``reference_batch_size`` images per step and is scaled linearly to the
global batch (Goyal et al.), so a config keeps its meaning on any number of GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.config import ConfigError


def scaled_lr(base_lr: float, *, global_batch: int, reference_batch_size: int) -> float:
    """The linear scaling rule: ``base_lr * global_batch / reference_batch_size``."""
    if reference_batch_size < 1:
        raise ConfigError(f"train.reference_batch_size must be >= 1, got {reference_batch_size}")
    return base_lr * global_batch / reference_batch_size


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group and an undecayed one (every tensor of
    at most one dimension: biases and norm scales/shifts)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, weight_decay), lr=lr, momentum=momentum)


def lr_factor(
    step: int,
    *,
    max_steps: int,
    warmup_iters: int,
    warmup_factor: float,
    schedule: str,
    milestones: Sequence[int],
    gamma: float,
) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if schedule == "multistep":
        decay = gamma ** sum(1 for milestone in milestones if step >= milestone)
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max(1, max_steps)))
    else:
        raise ConfigError(f"unknown train.lr_schedule {schedule!r}; use multistep or cosine")
    if step < warmup_iters:
        alpha = step / warmup_iters
        decay *= warmup_factor * (1.0 - alpha) + alpha
    return decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    max_steps: int,
    warmup_iters: int,
    warmup_factor: float,
    schedule: str,
    milestones: Sequence[int],
    gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state is just the step count, so a
    checkpoint restores it exactly."""
    milestones = sorted(milestones)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            max_steps=max_steps,
            warmup_iters=warmup_iters,
            warmup_factor=warmup_factor,
            schedule=schedule,
            milestones=milestones,
            gamma=gamma,
        )

    factor(0)  # fail on a bad schedule name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimization(cfg, model: nn.Module, world_size: int):
    """(optimizer, scheduler, lr) of ``cfg.train`` for a run of ``world_size`` processes."""
    train = cfg.train
    lr = scaled_lr(
        train.lr,
        global_batch=train.batch_size * world_size * train.grad_accum_steps,
        reference_batch_size=train.reference_batch_size,
    )
    optimizer = build_optimizer(
        model, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
    scheduler = build_scheduler(
        optimizer,
        max_steps=train.max_steps,
        warmup_iters=train.warmup_iters,
        warmup_factor=train.warmup_factor,
        schedule=train.lr_schedule,
        milestones=train.lr_steps,
        gamma=train.lr_gamma,
    )
    return optimizer, scheduler, lr
