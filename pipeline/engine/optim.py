"""The optimizer and the learning-rate schedule of the train stage.

SGD with momentum as in detectron2 and torchvision's references: no weight decay on norm
weights and biases (decaying a GroupNorm or BatchNorm scale towards zero only fights the
normalization), a linear warm-up, then multi-step or cosine decay.

A config's schedule is meant for ``reference_batch_size`` images per step. On a global batch
B (processes x batch x accumulation) of another size, the run keeps the config's meaning in
images, as detectron2's ``REFERENCE_WORLD_SIZE`` does: the learning rate is scaled linearly
(Goyal et al.), ``lr x B / R``, and with ``train.scale_schedule`` (the default) the steps,
the milestones, the warm-up and the checkpoint interval are scaled by ``R / B`` and rounded,
so "1x" stays 1x epochs on 8 GPUs or on 64. ``config.yaml`` keeps what was given; the start
line and the MLflow tags state the effective values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Schedule:
    """The schedule a run follows on its global batch (see the module docstring)."""

    global_batch: int
    lr: float
    max_steps: int
    warmup_iters: int
    milestones: tuple[int, ...]
    checkpoint_every: int

    def describe(self) -> str:
        return (
            f"{self.max_steps} steps of {self.global_batch} images at lr {self.lr:.5g}, "
            f"warm-up {self.warmup_iters}, milestones {list(self.milestones)}, "
            f"checkpoint every {self.checkpoint_every}"
        )


def effective_schedule(
    *,
    lr: float,
    max_steps: int,
    warmup_iters: int,
    milestones: Sequence[int],
    checkpoint_every: int,
    global_batch: int,
    reference_batch_size: int,
    scale_steps: bool,
) -> Schedule:
    """The config's schedule, meant for ``reference_batch_size`` images a step, on
    ``global_batch`` images a step: lr scaled up by B/R, step counts down by R/B (rounded; a
    step count that was positive stays at least 1)."""
    ratio = reference_batch_size / global_batch if scale_steps else 1.0

    def steps(value: int) -> int:
        return max(1, round(value * ratio)) if value > 0 else value

    return Schedule(
        global_batch=global_batch,
        lr=scaled_lr(lr, global_batch=global_batch, reference_batch_size=reference_batch_size),
        max_steps=steps(max_steps),
        warmup_iters=round(warmup_iters * ratio),
        milestones=tuple(sorted(round(m * ratio) for m in milestones)),
        checkpoint_every=steps(checkpoint_every),
    )


def build_schedule(cfg, world_size: int) -> Schedule:
    """The effective schedule of ``cfg.train`` on ``world_size`` processes."""
    train = cfg.train
    return effective_schedule(
        lr=train.lr,
        max_steps=train.max_steps,
        warmup_iters=train.warmup_iters,
        milestones=train.lr_steps,
        checkpoint_every=train.checkpoint_every,
        global_batch=train.batch_size * world_size * train.grad_accum_steps,
        reference_batch_size=train.reference_batch_size,
        scale_steps=train.scale_schedule,
    )


def build_optimization(cfg, model: nn.Module, schedule: Schedule):
    """(optimizer, scheduler) of ``cfg.train`` following ``schedule``."""
    train = cfg.train
    optimizer = build_optimizer(
        model, lr=schedule.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
    scheduler = build_scheduler(
        optimizer,
        max_steps=schedule.max_steps,
        warmup_iters=schedule.warmup_iters,
        warmup_factor=train.warmup_factor,
        schedule=train.lr_schedule,
        milestones=schedule.milestones,
        gamma=train.lr_gamma,
    )
    return optimizer, scheduler


def place_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, *, lr: float, step: int) -> None:
    """Put the scheduler (and its optimizer's learning rates) at ``step`` of the schedule of
    base rate ``lr``. After a resume, the optimizer's and scheduler's saved states hold the
    rates of the run that saved them; on another global batch they are not this run's."""
    scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch = step
    rates = [lr * fn(step) for fn in scheduler.lr_lambdas]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["initial_lr"] = lr
        group["lr"] = rate
    scheduler._last_lr = rates
