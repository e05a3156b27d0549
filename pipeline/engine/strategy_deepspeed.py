"""The DeepSpeed ZeRO 0/1/2 strategy (see ``strategy.py`` for the API the loop uses).

Our optimizer and scheduler are handed to ``deepspeed.initialize``; DeepSpeed's own gradient
accumulation, clipping, ``torch_autocast`` and checkpoint format are used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, entry_name, publish
from .strategy import check_amp


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
