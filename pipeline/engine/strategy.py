"""Data-parallel strategies: DDP (or one process) and DeepSpeed ZeRO, behind one small API.

The loop (``loop.py``) calls, per micro-batch, ``sync_context(last)``, ``forward`` and
``backward``, and per optimizer step ``optimizer_step``; checkpoints go through
``save``/``load``. What differs between the engines stays here:

* DDP: ``forward_sync_buffers=False`` (frozen BatchNorm buffers never change, and trainable
  BatchNorm keeps per-rank statistics, as detectron2 does), no ``find_unused_parameters``
  (every trainable parameter gets a gradient each step, and the search costs a graph walk per
  step), ``no_sync`` on all but the last micro-batch of an accumulated step. Clipping,
  the grad scaler (fp16 on CUDA) and the scheduler are ours.
* DeepSpeed: ZeRO 0/1/2 with our optimizer and scheduler handed to ``deepspeed.initialize``;
  its own gradient accumulation, clipping, ``torch_autocast`` and checkpoint format are used.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import ConfigError

from .checkpoint import (
    CheckpointError,
    entry_name,
    load_file_checkpoint,
    publish,
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
                forward_sync_buffers=False,
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
        """Clip, step, schedule; returns the gradient norm before clipping (nan if unknown)."""
        self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        else:
            norm = float("nan")
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
        if not is_main:  # rank 0 holds the same model and optimizer as everyone
            return
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **client_state,
        }
        save_file_checkpoint(ckpt_dir, step, state, keep)

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


def deepspeed_config(
    *,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    zero_stage: int,
    clip_grad_norm: float,
    amp: str,
    bucket_mb: int,
) -> dict[str, Any]:
    """Our YAML settings translated into DeepSpeed's config dict."""
    bucket = int(bucket_mb * 1024 * 1024 / 4)  # DeepSpeed counts elements, not bytes
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": clip_grad_norm,
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        # Our SGD (parameter groups without decay on norms and biases) under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our loop prints progress
        "wall_clock_breakdown": False,
    }
    if amp != "off":
        # Not DeepSpeed's "bf16"/"fp16" sections: they cast the model to half precision,
        # which breaks BatchNorm; torch_autocast keeps fp32 weights and autocasts the ops.
        dtype = "bfloat16" if amp == "bf16" else "float16"
        config["torch_autocast"] = {"enabled": True, "dtype": dtype}
    return config


class DeepSpeedStrategy:
    """DeepSpeed ZeRO 0/1/2; every rank takes part in saving and loading."""

    uses_directory_checkpoints = True

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
        micro_batch: int,
        accumulation: int,
        zero_stage: int,
    ):
        import deepspeed  # imported here: slow, and DDP runs do not need it

        check_amp(amp, device)
        self.module = model
        self.device, self.amp = device, amp
        config = deepspeed_config(
            micro_batch=micro_batch,
            accumulation=accumulation,
            world_size=world_size,
            zero_stage=zero_stage,
            clip_grad_norm=clip_grad_norm,
            amp=amp,
            bucket_mb=bucket_mb,
        )
        # DeepSpeed flattens the parameters through byte views, which need standard
        # (NCHW-contiguous) strides; the convolutions still run NHWC on channels_last inputs.
        # (is_contiguous() is no test: a channels_last [C, K, 1, 1] weight passes it.)
        for param in model.parameters():
            if param.dim() == 4:
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine

    def sync_context(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary

    def forward(self, images, targets) -> dict[str, torch.Tensor]:
        return self.engine(images, targets)  # under DeepSpeed's torch_autocast when amp is on

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        # DeepSpeed scales by its gradient_accumulation_steps itself, and steps the optimizer
        # (and our scheduler) only at the accumulation boundary.
        self.engine.backward(loss)
        self.engine.step()

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, is_main: bool, keep: int
    ) -> None:
        import torch.distributed as dist

        tag = entry_name(step, directory=True)
        tmp_tag = f".{tag}.tmp"
        self.engine.save_checkpoint(
            str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False
        )
        if dist.is_initialized():
            dist.barrier()
        if is_main:
            (ckpt_dir / tmp_tag).replace(ckpt_dir / tag)
            publish(ckpt_dir, tag, keep)
        if dist.is_initialized():
            dist.barrier()

    def load(self, path: Path, load_model) -> dict[str, Any]:
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a DDP checkpoint file; resume it with distributed.strategy=ddp"
            )
        loaded, client_state = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=True,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        return client_state or {}


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
