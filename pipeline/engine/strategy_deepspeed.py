"""The DeepSpeed ZeRO 0/1/2 strategy (see ``strategy.py`` for the API the loop uses).

Our optimizer and scheduler are handed to ``deepspeed.initialize``; DeepSpeed's own gradient
accumulation, clipping, ``torch_autocast`` and checkpoint format are used, with three
corrections that make it train and resume as DDP does (DeepSpeed 0.19):

* Gradients are all-reduced in fp32 under ``train.amp``, as DDP does: ``torch_autocast``
  would otherwise reduce those of exact ``nn.Conv2d``/``nn.Linear`` modules in half
  precision (``lower_precision_safe_modules``, an exact-class match that skips our Conv2d).
* fp16 under ZeRO-1/2 scales the loss with a scale that DeepSpeed knows (``LossScale``,
  GradScaler's rules): with its own ``torch_autocast`` GradScaler, ZeRO clips the still-scaled
  gradients and reports their norm as if the scale were 1, and an overflow skips the step
  without lowering the scale, so every later step overflows too.
* ZeRO-1/2 optimizer states are partitioned by the world size; a checkpoint saved at another
  world size is resharded on load (DeepSpeed itself refuses it).

DeepSpeed also needs a process group where DDP needs none: one process started without a
launcher gets a process group of its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed import resolve_backend

from .checkpoint import (
    CheckpointError,
    entry_name,
    move_into_place,
    publish,
    remove_path,
    sync_tree,
    temporary_name,
)
from .strategy import check_amp

# DeepSpeed's names for the ZeRO-1/2 partition files and their keys (deepspeed/checkpoint/
# constants.py and DeepSpeedEngine._get_rank_zero_ckpt_name).
_ZERO_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_OPTIMIZER_STATE_DICT = "optimizer_state_dict"
_BASE_OPTIMIZER_STATE = "base_optimizer_state"
_FP32_PARTITIONS = "single_partition_of_fp32_groups"  # saved without the alignment padding
_GROUP_PADDINGS = "group_paddings"


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
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": dtype,
            # No module's gradients are all-reduced in half precision: by default ZeRO-1/2
            # reduces those of exact nn.Conv2d/nn.Linear in `dtype` (losing bits, and fp16
            # sums of scaled gradients can overflow) and our Conv2d subclass in fp32. DDP
            # reduces everything in fp32; so does this.
            "lower_precision_safe_modules": [],
        }
    return config


class LossScale:
    """The fp16 loss scale of ZeRO-1/2 runs, with torch.amp.GradScaler's defaults and rules:
    halved after a step with non-finite gradients (which is skipped), doubled after
    ``growth_interval`` finite steps in a row."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.finite_steps = 0

    def update(self, *, overflow: bool) -> None:
        if overflow:
            self.scale *= 0.5
            self.finite_steps = 0
            return
        self.finite_steps += 1
        if self.finite_steps == self.growth_interval:
            self.scale *= 2.0
            self.finite_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "finite_steps": self.finite_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.finite_steps = int(state["finite_steps"])


def zero_partition_files(path: Path) -> list[Path]:
    """The ZeRO-1/2 optimizer partitions of a DeepSpeed checkpoint entry, by rank."""
    found = {}
    for file in path.iterdir():
        match = _ZERO_FILE.match(file.name)
        if match:
            found[int(match.group(1))] = file
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{path}: ZeRO partitions of ranks {sorted(found)} only")
    return [found[rank] for rank in range(len(found))]


def join_process_group(device: torch.device) -> None:
    """A process group of one for a process that no launcher started: DeepSpeed needs one
    (it would look for MPI otherwise) and the launcher's variables (it asserts LOCAL_RANK).
    In-memory store, so no port is taken."""
    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    backend = resolve_backend("auto") if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer: torch.optim.Optimizer):
    """``optimizer.step`` does nothing inside: DeepSpeed's ZeRO-0 step then only clears the
    gradients and steps the scheduler. The instance's own ``step`` (the scheduler wraps it
    there) is put back afterwards."""
    saved = optimizer.__dict__.get("step")
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if saved is None:
            del optimizer.step
        else:
            optimizer.step = saved


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
        self.world_size, self.zero_stage = world_size, zero_stage
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
        if world_size == 1:
            join_process_group(device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine
        self.loss_scale = self._own_fp16_loss_scale() if amp == "fp16" and zero_stage else None
        self._zero0_norm = float("nan")

    def _own_fp16_loss_scale(self) -> LossScale:
        """Take fp16 loss scaling from the GradScaler that DeepSpeed's ZeRO-1/2 makes for
        torch_autocast, and give it a scale of ours that ZeRO knows (DeepSpeed 0.19,
        runtime/zero/stage_1_and_2.py). That GradScaler scales the loss, but ZeRO's own
        `loss_scale` stays 1 for fp32 parameters, so `step()` reports the scaled norm as the
        norm and `unscale_and_clip_grads` clips the scaled gradients to `gradient_clipping`;
        GradScaler.step then divides them by the scale again (updates ~65,536x too small).
        And a non-finite norm returns from `step()` before GradScaler.update, so the scale
        never drops. With `override_loss_scale`, ZeRO multiplies the loss by our scale,
        divides the norm by it and unscales before it clips, as DDP's GradScaler does; we
        lower or raise the scale after each step (`optimizer_step`)."""
        zero = self.engine.optimizer
        if not hasattr(zero, "torch_autocast_gradscaler") or not hasattr(
            zero, "override_loss_scale"
        ):
            raise RuntimeError(
                f"train.amp=fp16: {type(zero).__name__} is not the DeepSpeed 0.19 ZeRO-1/2 "
                "optimizer this strategy corrects; use train.amp=bf16 or DeepSpeed 0.19"
            )
        zero.torch_autocast_gradscaler = None
        scale = LossScale()
        zero.override_loss_scale(scale.scale)
        return scale

    def sync_context(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary

    def forward(self, images, targets) -> dict[str, torch.Tensor]:
        return self.engine(images, targets)  # under DeepSpeed's torch_autocast when amp is on

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        # DeepSpeed scales by its gradient_accumulation_steps itself, and steps the optimizer
        # (and our scheduler) only at the accumulation boundary.
        self.engine.backward(loss)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # ZeRO-0 applies whatever gradients it has (it keeps a norm only when it clips):
            # check them as DDPStrategy does, after the boundary's all-reduce.
            self._zero0_norm = self._zero0_gradient_norm()
            if not math.isfinite(self._zero0_norm):
                with _optimizer_step_skipped(self.engine.optimizer):
                    self.engine.step()  # the scheduler moves on, the gradients are cleared
                return
        self.engine.step()

    def _zero0_gradient_norm(self) -> float:
        """The norm of ZeRO-0's all-reduced gradients, the same on every rank (one fused
        reduction, one host read); those of fp16 are still scaled by its GradScaler."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads))
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        return norm / scaler.get_scale() if scaler is not None else norm

    def optimizer_step(self) -> float:
        """After the boundary's `engine.step()`: the gradient norm before clipping. It is not
        finite exactly when the step was skipped, as DDPStrategy's, for the loop to count."""
        if self.zero_stage == 0:
            return self._zero0_norm
        norm = self.engine.get_global_grad_norm()
        # ZeRO-1/2 skips a step whose gradient norm is not finite (fp16 overflow or a NaN in
        # any precision: the norm is all-reduced, so every rank skips), and then does not step
        # the scheduler either; DDP's GradScaler skips only the optimizer step. Step it here,
        # so that the learning rate follows the loop's step count as under DDP.
        skipped = bool(getattr(self.engine.optimizer, "overflow", False))
        if skipped:
            self.scheduler.step()
        if self.loss_scale is not None:
            self.loss_scale.update(overflow=skipped)
            self.engine.optimizer.override_loss_scale(self.loss_scale.scale)
        if skipped:
            return float("inf") if norm is None or math.isfinite(norm) else float(norm)
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def _scaler_state(self) -> dict[str, Any] | None:
        if self.loss_scale is not None:
            return self.loss_scale.state_dict()
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)  # ZeRO-0 fp16
        return scaler.state_dict() if scaler is not None else None

    def _load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state)
            self.engine.optimizer.override_loss_scale(self.loss_scale.scale)
            return
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            scaler.load_state_dict(state)

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, is_main: bool, keep: int
    ) -> None:
        tag = entry_name(step, directory=True)
        tmp = ckpt_dir / temporary_name(tag)  # one name for every rank: no pid in it
        scaler = self._scaler_state()  # DeepSpeed saves neither our scale nor its GradScaler
        if scaler is not None:
            client_state = {**client_state, "fp16_scaler": scaler}
        if is_main:
            # A killed save's directory: DeepSpeed would write into it, and the files of its
            # ranks that this run lacks would end up in the entry (a resume would take them
            # for this run's ZeRO partitions).
            remove_path(tmp)
        if dist.is_initialized():
            dist.barrier()
        self.engine.save_checkpoint(
            str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False
        )
        if dist.is_initialized():
            dist.barrier()
        if is_main:
            sync_tree(tmp)
            move_into_place(tmp, ckpt_dir / tag)
            publish(ckpt_dir, tag, keep)
        if dist.is_initialized():
            dist.barrier()

    def load(self, path: Path, load_model) -> dict[str, Any]:
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a DDP checkpoint file; resume it with distributed.strategy=ddp"
            )
        partitions = zero_partition_files(path) if self.zero_stage else []
        if self.zero_stage and not partitions:
            raise CheckpointError(
                f"{path} holds no ZeRO optimizer partitions (saved with "
                "distributed.zero_stage=0); resume it with distributed.zero_stage=0"
            )
        # DeepSpeed refuses ZeRO-1/2 optimizer states saved at another world size
        # (DeepSpeedEngine._load_zero_checkpoint); those are resharded below instead.
        reshard = bool(partitions) and len(partitions) != self.world_size
        loaded, client_state = self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=not reshard,
            load_lr_scheduler_states=True,
            load_module_strict=True,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        if reshard:
            self._reshard_optimizer_state(path, partitions)
        self._load_scaler_state((client_state or {}).get("fp16_scaler"))
        return client_state or {}

    def _reshard_optimizer_state(self, path: Path, partitions: list[Path]) -> None:
        """Our optimizer's state (SGD's momentum), saved as ``len(partitions)`` ZeRO
        partitions, re-cut into this world size's partition of this rank.

        A ZeRO-1/2 parameter group is one flat tensor: the parameters in order, then zero
        padding up to a multiple of the world size, cut into equal partitions, one per rank.
        Each saved partition's state, less its padding, is concatenated back into the whole
        group, padded for this world size and cut again. The fp32 master weights need no
        such work: DeepSpeed rebuilt them from the loaded fp32 model weights, exactly. The
        learning rate in the optimizer is the scheduler's last one, as a full load sets it.
        """
        zero = self.engine.optimizer
        saved = [
            torch.load(file, map_location="cpu", weights_only=False)[_OPTIMIZER_STATE_DICT]
            for file in partitions
        ]
        inner = zero.optimizer  # our SGD, over one flat partition per parameter group
        for i in range(len(inner.param_groups)):
            flat = zero.single_partition_of_fp32_groups[i]
            numel = sum(param.numel() for param in zero.bit16_groups[i])
            pieces: dict[str, list[torch.Tensor]] = {}
            scalars: dict[str, Any] = {}
            for state in saved:
                base = state[_BASE_OPTIMIZER_STATE]
                if not isinstance(base, dict) or "state" not in base:
                    raise CheckpointError(
                        f"{path}: ZeRO optimizer states in a layout this strategy cannot "
                        f"reshard; resume it on {len(partitions)} process(es)"
                    )
                lean = state[_FP32_PARTITIONS][i].numel()
                padded = lean + state[_GROUP_PADDINGS][i]
                param_id = base["param_groups"][i]["params"][0]
                for key, value in base["state"].get(param_id, {}).items():
                    if torch.is_tensor(value) and value.dim() == 1 and value.numel() == padded:
                        pieces.setdefault(key, []).append(value[:lean])
                    else:  # not per element (Adam's step count): the same on every rank
                        scalars[key] = value
            for key, value in scalars.items():
                inner.state[flat][key] = value
            for key, parts in pieces.items():
                if len(parts) != len(partitions) or sum(p.numel() for p in parts) != numel:
                    raise CheckpointError(
                        f"{path}: optimizer state {key!r} of parameter group {i} does not "
                        f"match this model's {numel} parameters; resume it on "
                        f"{len(partitions)} process(es) with the same model"
                    )
                whole = torch.zeros(zero.bit16_groups_flat[i].numel(), dtype=flat.dtype)
                whole[:numel] = torch.cat(parts)
                rank = dist.get_rank(group=zero.real_dp_process_group[i])
                mine = zero.get_data_parallel_partitions(whole, i)[rank]
                inner.state[flat][key] = mine.to(device=flat.device, copy=True)
        for group, lr in zip(inner.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
