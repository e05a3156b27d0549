"""What the training loop does with NaN and Inf: a batch whose loss is not finite is skipped,
an optimizer step whose gradient norm is not finite is skipped (by the strategy, on every rank
alike), ``train.max_nonfinite_steps`` of them in a row stop the run, and no checkpoint is
written with non-finite weights or BatchNorm statistics."""

from __future__ import annotations

import logging
import math

import torch

from pipeline.collectives import any_rank

log = logging.getLogger("pipeline.train")


class NonFiniteLossError(RuntimeError):
    """Too many batches or optimizer steps in a row had a NaN or Inf loss or gradient norm,
    or the weights are not finite where a checkpoint would be written."""


class NonFiniteCount:
    """Non-finite losses (a batch skipped) and gradient norms (an optimizer step skipped) since
    the last optimizer step applied; raises NonFiniteLossError when ``limit`` are reached."""

    def __init__(self, limit: int):
        self.limit = limit
        self.losses = self.norms = 0

    def add_loss(self, step: int, losses: dict[str, float], *, log_it: bool) -> None:
        self.losses += 1
        if log_it:
            log.warning(
                "step %d: non-finite loss on some rank %s; batch skipped (%d in a row)",
                step,
                losses,
                self.losses + self.norms,
            )
        self._check(step, f"last losses {losses}")

    def add_step(self, step: int, grad_norm: float, *, log_it: bool) -> None:
        if math.isfinite(grad_norm):
            self.losses = self.norms = 0
            return
        self.norms += 1
        if log_it:
            log.warning(
                "step %d: non-finite gradient norm (%s) with finite losses; optimizer step "
                "skipped (%d in a row)",
                step,
                grad_norm,
                self.losses + self.norms,
            )
        self._check(step, f"last gradient norm {grad_norm}")

    def _check(self, step: int, last: str) -> None:
        count = self.losses + self.norms
        if count < self.limit:
            return
        if not self.norms:
            what = "batches in a row had a NaN or Inf loss"
        elif not self.losses:
            what = "optimizer steps in a row had a NaN or Inf gradient norm"
        else:
            what = (
                f"batches and optimizer steps in a row had a NaN or Inf loss ({self.losses}) "
                f"or gradient norm ({self.norms})"
            )
        # Clipping bounds a large finite gradient, not a NaN one.
        clip = ", set train.clip_grad_norm," if self.losses else ""
        raise NonFiniteLossError(
            f"{count} {what} at step {step}; lower train.lr{clip} or check the data ({last})"
        )


class BatchNormStatistics:
    """The running statistics of a model's BatchNorm layers, kept from before each forward:
    the forward updates them before the loss is seen to be NaN, and NaN activations would
    stay in them after the batch is skipped (and then in every checkpoint). One fused copy
    of a few thousand values per micro-batch; nothing without trainable BatchNorm."""

    NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, module: torch.nn.Module):
        self.live = [b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] in self.NAMES]
        self.kept = [b.clone() for b in self.live]

    def keep(self) -> None:
        if self.live:
            torch._foreach_copy_(self.kept, self.live)

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.kept)


def check_finite_state(module: torch.nn.Module, step: int) -> None:
    """Raise NonFiniteLossError on every rank if any rank's parameters or floating buffers
    (BatchNorm's running statistics) hold a NaN or Inf: no checkpoint is written with them.
    A finite gradient can still overflow a weight, and a rank's own BatchNorm statistics can
    differ from rank 0's. One fused norm (finite only if every value is; a max-abs norm is
    20x slower on the CPU), one host read and one tiny all-reduce per checkpoint; the exact
    per-tensor check runs only when the norm is not finite (which a norm above 1.8e19 of
    finite values would also make it)."""
    named = [
        (name, tensor)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_floating_point()
    ]
    total = torch.nn.utils.get_total_norm([tensor for _, tensor in named])
    names = []
    if not bool(torch.isfinite(total)):
        names = [name for name, tensor in named if not bool(torch.isfinite(tensor).all())]
    (bad,) = any_rank([bool(names)])
    if not bad:
        return
    where = (
        f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" if names else "on another rank"
    )
    raise NonFiniteLossError(
        f"the model's weights or BatchNorm statistics are not finite at step {step} ({where}); "
        "its checkpoint is not written (checkpoints/latest stays the last finite one); lower "
        "train.lr or set train.clip_grad_norm"
    )
