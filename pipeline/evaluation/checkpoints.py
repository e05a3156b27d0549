"""Finding, reading and rebuilding the model of the checkpoint to evaluate.

A checkpoint path is one of (see /work/notes/contracts.md, "Training run directory"):

- a checkpoint file: ours (``{"model", "model_args", "step", "config", "tracking", ...}``,
  from DDP or one process), one converted from torchvision by
  ``launch/convert_torchvision.py`` (``{"model", "model_args", "source": "torchvision"}``), or
  a raw torchvision ``maskrcnn_resnet50_fpn`` state dict (converted here);
- a DeepSpeed checkpoint directory (``OUT/checkpoints/step_0000100/``), whose
  ``mp_rank_00_model_states.pt`` holds DeepSpeed's ``"module"`` and our client-state keys;
- a directory with a ``latest`` file (DeepSpeed's save directory, ``OUT/checkpoints``) or a
  training output_dir (``OUT/checkpoints/latest``): the entry ``latest`` names.

Every problem is a :class:`CheckpointError` with one line naming the path and what does not
match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.modeling import MaskRCNN

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
LATEST_FILE = "latest"
FINISHED_FILE = "FINISHED"
# A complete checkpoint entry of a training run; temporary names never match.
ENTRY_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
# Prefixes wrappers put on every key: DDP / DeepSpeed ("module."), torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCHVISION_PROBE = "roi_heads.box_predictor.cls_score.weight"
_TORCHVISION_FPN_PROBE = "backbone.fpn.inner_blocks.0.0.weight"
# Arguments that only concern how inference runs, taken from the evaluation's config.
INFERENCE_ARGS = ("min_size_test", "max_size_test", "channels_last")


class CheckpointError(ValueError):
    """The checkpoint is missing or does not fit; the message is one line naming it."""


@dataclass
class LoadedCheckpoint:
    path: Path
    """The file, or the DeepSpeed tag directory, that was read."""
    state: dict[str, Tensor]
    """The model's state dict (no wrapper prefixes; torchvision names already converted)."""
    model_args: dict[str, Any] | None
    """MaskRCNN constructor kwargs recorded in the checkpoint; None if it has none."""
    step: int | None
    """The training step, None for a checkpoint not written by training."""
    config: str | None = None
    """The training run's resolved config (YAML), when recorded."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """``{"run_id", "uri"}`` of the training run's MLflow run, when recorded."""
    source: str = "pipeline"
    """pipeline, deepspeed or torchvision."""

    @property
    def name(self) -> str:
        """The entry name (``step_0000100.pt``, ``step_0000100``, or the file name)."""
        return self.path.name


def entry_step(name: str) -> int | None:
    """The step of a checkpoint entry name (``step_0000100.pt`` -> 100), None otherwise."""
    match = ENTRY_PATTERN.match(name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file or DeepSpeed tag directory that ``path`` designates."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return path
    for latest in (path / LATEST_FILE, path / "checkpoints" / LATEST_FILE):
        if latest.is_file():
            name = latest.read_text().strip()
            entry = latest.parent / name
            if not name or not (entry.is_file() or (entry / DEEPSPEED_MODEL_FILE).is_file()):
                raise CheckpointError(f"checkpoint {latest}: names {name!r}, which is not there")
            return entry
    raise CheckpointError(
        f"checkpoint {path}: a directory without {DEEPSPEED_MODEL_FILE}, {LATEST_FILE} or "
        f"checkpoints/{LATEST_FILE} (not a DeepSpeed checkpoint or a training output_dir)"
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as error:  # unpickling fails in many ways; DeepSpeed states may need
        # a full unpickler (its file holds more than tensors): retry only for those
        if path.name == DEEPSPEED_MODEL_FILE and "weights_only" in str(error):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as second:
                error = second
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({reason})") from None


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read the checkpoint at ``path`` (see the module docstring for the forms)."""
    resolved = resolve_checkpoint(path)
    deepspeed = resolved.is_dir()
    data = _torch_load(resolved / DEEPSPEED_MODEL_FILE if deepspeed else resolved)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"checkpoint {resolved}: holds a {type(data).__name__}, not a dict")
    state_key = "module" if deepspeed else "model"
    if isinstance(data.get(state_key), Mapping):
        state, source = data[state_key], "deepspeed" if deepspeed else data.get("source")
    elif data and all(isinstance(v, Tensor) for v in data.values()):
        state, source = data, "raw"  # a bare state dict
    else:
        raise CheckpointError(
            f"checkpoint {resolved}: no model state dict under {state_key!r} "
            f"(keys: {sorted(map(str, data))[:6]})"
        )
    state = _strip_prefixes(state)
    model_args = data.get("model_args")
    if source == "raw" and _TORCHVISION_PROBE in state and _TORCHVISION_FPN_PROBE in state:
        model_args = MaskRCNN.torchvision_model_args(state)
        state, source = MaskRCNN.convert_torchvision_state_dict(state), "torchvision"
    step = data.get("step")
    tracking = data.get("tracking") if isinstance(data.get("tracking"), Mapping) else {}
    return LoadedCheckpoint(
        path=resolved,
        state=state,
        model_args=dict(model_args) if isinstance(model_args, Mapping) else None,
        step=int(step) if step is not None else entry_step(resolved.name),
        config=data.get("config") if isinstance(data.get("config"), str) else None,
        tracking=dict(tracking),
        source=str(source or "pipeline"),
    )


def build_eval_model(
    checkpoint: LoadedCheckpoint,
    *,
    num_classes: int,
    class_source: str,
    inference_args: Mapping[str, Any],
    fallback_args: Mapping[str, Any] | None = None,
) -> MaskRCNN:
    """The checkpoint's model in eval mode, its weights loaded strictly.

    The architecture comes from the checkpoint's ``model_args`` (``fallback_args``, the
    config's, for a checkpoint that records none); ``inference_args`` (``INFERENCE_ARGS``:
    the test resize and memory format) override it, so that the model does not resize the
    loader's images a second time. ``num_classes`` is what the data needs (``class_source``
    names the data in the error)."""
    where = f"checkpoint {checkpoint.path}"
    args = checkpoint.model_args if checkpoint.model_args is not None else fallback_args
    if args is None:
        raise CheckpointError(f"{where}: records no model_args and no config gives them")
    args = dict(args)
    if int(args.get("num_classes", -1)) != num_classes:
        raise CheckpointError(
            f"{where}: the model has num_classes={args.get('num_classes')}, {class_source} "
            f"needs {num_classes} ({num_classes - 1} categories + background)"
        )
    args.update({key: inference_args[key] for key in INFERENCE_ARGS if key in inference_args})
    try:
        model = MaskRCNN(**args)
    except (TypeError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{where}: model_args do not build a model ({reason})") from None
    load_exact(model, checkpoint.state, where)
    return model.eval()


def load_exact(model: MaskRCNN, state: Mapping[str, Tensor], where: str) -> None:
    """Load every tensor of ``state`` into ``model``; any missing, unexpected or mis-shaped
    one fails with a single line naming the first few."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{where}: does not match its model_args: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
