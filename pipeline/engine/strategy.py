"""Data-parallel strategies: DDP (or one process) and DeepSpeed ZeRO, behind one small API.

The loop (``loop.py``) calls, per micro-batch, ``sync_context(last)``, ``forward`` and
``backward``, and per optimizer step ``optimizer_step``; checkpoints go through
``save``/``load``. What differs between the engines stays here:

* DDP: ``forward_sync_buffers=False`` (frozen BatchNorm buffers never change, and trainable
  BatchNorm keeps per-rank statistics, as detectron2 does), no ``find_unused_parameters``
  (every trainable parameter gets a gradient each step, and the search costs a graph walk per
  step), ``no_sync`` on all but the last micro-batch of an accumulated step. Clipping,
  the grad scaler (fp16 on CUDA) and the scheduler are ours.
* DeepSpeed (``strategy_deepspeed.py``): ZeRO 0/1/2 with our optimizer and scheduler
  handed to ``deepspeed.initialize``; its own accumulation, clipping, ``torch_autocast``
  and checkpoint format are used.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.collectives import barrier
from pipeline.config import ConfigError

from .checkpoint import (
    CheckpointError,
    load_file_checkpoint,
    save_file_checkpoint,
)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("pipeline.train")


def autocast_context(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"train.amp={amp!r}: use off, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA (the grad scaler); use bf16 on the CPU")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(
            "train.amp=bf16: this CPU (%s) has no AVX512-BF16/AMX, so oneDNN runs bfloat16 "
            "convolutions on a slow path (about 4x slower than float32 on an AVX2 CPU); "
            "train.amp=off is faster here",
            torch.backends.cpu.get_cpu_capability(),
        )


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def no_buffer_broadcast_argument() -> str:
    """DDP's name for "broadcast the buffers before each forward": ``forward_sync_buffers``
    since torch 2.13, ``broadcast_buffers`` before (the GPU check runs on torch 2.11)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"


class DDPStrategy:
    """One process, or DistributedDataParallel over the default process group."""

    uses_directory_checkpoints = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        device: torch.device,
        world_size: int,
        amp: str,
        clip_grad_norm: float,
        bucket_mb: int,
    ):
        check_amp(amp, device)
        self.module = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.amp, self.clip = device, amp, clip_grad_norm
        self.model: nn.Module = model
        if world_size > 1:
            self.model = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # Per-rank BatchNorm statistics: no buffer broadcast before each forward
                # (buffers are synced once at wrap time, where every rank holds the same).
                **{no_buffer_broadcast_argument(): False},
                find_unused_parameters=False,
                bucket_cap_mb=bucket_mb,
                gradient_as_bucket_view=True,
            )
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def sync_context(self, last_micro_batch: bool):
        """Gradients are all-reduced only on the last micro-batch of a step."""
        if last_micro_batch or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def forward(self, images, targets) -> dict[str, torch.Tensor]:
        with autocast_context(self.device, self.amp):
            return self.model(images, targets)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.scaler.scale(loss / accumulation).backward()

    def optimizer_step(self) -> float:
        """Clip, step, schedule; returns the gradient norm before clipping. A non-finite norm
        (NaN or Inf in some gradient) skips the optimizer step, and is returned for the loop
        to count; the scheduler moves on, as after a step that GradScaler skips.

        The gradients are DDP's all-reduced ones, the same on every rank, so every rank
        computes the same norm and takes the same decision without a collective of its own.
        The norm is computed with clipping off too (one fused reduction over the gradients and
        one host read per step): `clip_grad_norm_` with its defaults would apply NaN."""
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16; records GradScaler's inf check
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        norm = float(total)
        if not math.isfinite(norm):
            # Skipped without GradScaler.step; its update still halves the fp16 scale, from
            # the inf check unscale_ recorded. One skip, counted once by the loop.
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            with warnings.catch_warnings():
                # The schedule follows the loop's steps; torch warns when the first one is
                # skipped ("lr_scheduler.step() before optimizer.step()"), which is intended.
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                self.scheduler.step()
            return norm
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, total)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, is_main: bool, keep: int
    ) -> None:
        """Rank 0 writes and publishes the checkpoint (it holds the same model and optimizer
        as everyone); every rank returns only once it is published."""
        if is_main:
            state = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                **client_state,
            }
            save_file_checkpoint(ckpt_dir, step, state, keep)
        # A rank that went on would exit (75) after a preemption while rank 0 still writes,
        # and `srun --kill-on-bad-exit` or torchrun's agent would then kill rank 0 mid-write:
        # the requeued job would go back to the previous checkpoint. The wait is bounded by
        # the process group's timeout (distributed.timeout_s, 30 min by default): the
        # barrier runs on gloo, which raises, or with distributed.backend=nccl on NCCL, whose
        # watchdog aborts the job. A write slower than that (or than the grace after the
        # preemption signal: train.sbatch's --signal lead, torchrun's --shutdown-timeout)
        # loses only this checkpoint, since `latest` moves only once the entry is complete.
        barrier()

    def load(self, path: Path, load_model) -> dict[str, Any]:
        """Restore everything from a checkpoint file; returns it for the loop's own keys.
        ``load_model(model, state, source)`` is the strict model loader."""
        if path.is_dir():
            raise CheckpointError(
                f"{path} is a DeepSpeed checkpoint; resume it with distributed.strategy=deepspeed"
            )
        state = load_file_checkpoint(path)
        try:
            load_model(self.module, state["model"], str(path))
        except RuntimeError as error:  # a missing or mis-shaped tensor, named by the loader
            raise CheckpointError(f"cannot resume: {error}") from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return state


def build_strategy(cfg, model, optimizer, scheduler, *, device, world_size):
    """DDPStrategy or DeepSpeedStrategy for ``cfg.distributed.strategy``."""
    common = dict(
        device=device,
        world_size=world_size,
        amp=cfg.train.amp,
        clip_grad_norm=cfg.train.clip_grad_norm,
        bucket_mb=cfg.distributed.bucket_mb,
    )
    if cfg.distributed.strategy == "deepspeed":
        from .strategy_deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(
            model,
            optimizer,
            scheduler,
            micro_batch=cfg.train.batch_size,
            accumulation=cfg.train.grad_accum_steps,
            zero_stage=cfg.distributed.zero_stage,
            **common,
        )
    return DDPStrategy(model, optimizer, scheduler, **common)
