"""Finding, reading and rebuilding the model of the checkpoint to evaluate.

A checkpoint path is one of (the run directory's contract is ``pipeline/rundir.py``, shared
with the train stage that writes it):

- a checkpoint file: ours (``{"model", "model_args", "step", "config", "tracking", ...}``,
  from DDP or one process), one converted from torchvision by
  ``launch/convert_torchvision.py`` (``{"model", "model_args", "source": "torchvision"}``), or
  a raw torchvision ``maskrcnn_resnet50_fpn`` state dict (converted here);
- a DeepSpeed checkpoint directory (``OUT/checkpoints/step_0000100/``), whose
  ``mp_rank_00_model_states.pt`` holds DeepSpeed's ``"module"`` and our client-state keys;
- a directory with a ``latest`` file (DeepSpeed's save directory, ``OUT/checkpoints``) or a
  training output_dir (``OUT/checkpoints/latest``): the entry ``latest`` names (if it names
  an entry that is gone, the newest one there, as training resumes).

Every file is read with ``torch.load(weights_only=True)``, whoever wrote it. Every problem is
a :class:`CheckpointError` with one line naming the path and what does not match.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.serialization import get_unsafe_globals_in_checkpoint

from pipeline.modeling import MaskRCNN
from pipeline.modeling.label_map import (
    LABEL_MAP_KEY,
    LabelMap,
    LabelMapError,
    match_categories,
    missing_names,
)
from pipeline.rundir import DEEPSPEED_MODEL_FILE, CheckpointError, entry_step, resolve_entry

__all__ = [
    "DEEPSPEED_MODEL_FILE",
    "INFERENCE_ARGS",
    "CheckpointError",
    "LoadedCheckpoint",
    "build_eval_model",
    "dataset_labels",
    "load_checkpoint",
    "load_exact",
    "resolve_checkpoint",
]
# Prefixes wrappers put on every key: DDP / DeepSpeed ("module."), torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCHVISION_PROBE = "roi_heads.box_predictor.cls_score.weight"
_TORCHVISION_FPN_PROBE = "backbone.fpn.inner_blocks.0.0.weight"
# Arguments that only concern how inference runs, taken from the evaluation's config.
INFERENCE_ARGS = ("min_size_test", "max_size_test", "channels_last")


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
    label_map: LabelMap | None = None
    """What the model's outputs mean (recorded by training and by the torchvision
    conversion; a raw torchvision state dict of 91 outputs is COCO's); None if unknown."""

    @property
    def name(self) -> str:
        """The entry name (``step_0000100.pt``, ``step_0000100``, or the file name)."""
        return self.path.name


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file or DeepSpeed tag directory that ``path`` designates."""
    return resolve_entry(path)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, for DeepSpeed's model states too: unpickling
    anything else can run code that the file chooses, so a file's name or origin never buys
    more trust. DeepSpeed 0.19 stores only tensors, containers and numbers there (under
    ZeRO 0/1/2, with and without autocast); a type beyond those is refused, named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as error:  # unpickling fails in many ways
        try:  # reads the pickle's opcodes only, runs nothing
            unsafe = get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        if unsafe:
            shown = ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else "")
            raise CheckpointError(
                f"checkpoint {path}: refused: loading it would call {shown}; only tensors, "
                "containers and numbers are read"
            ) from None
        # torch's own text can be a bare number (KeyError 174812789 for random bytes) or
        # advise weights_only=False, the unsafe path: give the type and the first line only.
        first = (str(error).strip().splitlines() or [""])[0]
        reason = type(error).__name__ + (f": {first[:160]}" if "weights_only" not in first else "")
        raise CheckpointError(
            f"checkpoint {path}: not a file written by torch.save, or damaged ({reason}); give "
            "a training checkpoint, a converted torchvision .pt or a training output_dir"
        ) from None


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
        label_map=_label_map(data, model_args, source, resolved),
        path=resolved,
        state=state,
        model_args=dict(model_args) if isinstance(model_args, Mapping) else None,
        step=int(step) if step is not None else entry_step(resolved.name),
        config=data.get("config") if isinstance(data.get("config"), str) else None,
        tracking=dict(tracking),
        source=str(source or "pipeline"),
    )


def _label_map(data: Mapping, model_args, source, path: Path) -> LabelMap | None:
    num_classes = (model_args or {}).get("num_classes")
    if data.get(LABEL_MAP_KEY) is not None and num_classes is not None:
        try:
            return LabelMap.from_json(data[LABEL_MAP_KEY], num_classes, f"checkpoint {path}")
        except LabelMapError as error:
            raise CheckpointError(str(error)) from None
    coco = LabelMap.torchvision_coco()
    if source == "torchvision" and num_classes == coco.num_classes:
        return coco  # converted before checkpoints carried their map: torchvision's COCO model
    return None


def dataset_labels(
    checkpoint: LoadedCheckpoint, num_classes: int, manifest, class_source: str
) -> dict[int, int]:
    """Model output index -> the dataset's contiguous index (``manifest``'s 1..K), for the
    outputs that serve one of its categories: matched by category id and name through the
    checkpoint's label map (see :func:`~pipeline.modeling.label_map.match_categories`).
    A checkpoint without a map is taken to share the dataset's order when it has the same
    class count. A model that leaves a dataset category unserved is refused in one line
    naming what is missing (``class_source`` names the data)."""
    where = f"checkpoint {checkpoint.path}"
    if checkpoint.label_map is None:
        if num_classes != manifest.num_classes:
            raise CheckpointError(
                f"{where}: the model has num_classes={num_classes} and records no label map, "
                f"{class_source} needs {manifest.num_classes} ({manifest.num_classes - 1} "
                "categories + background)"
            )
        return {i: i for i in range(1, num_classes)}
    match = match_categories(checkpoint.label_map, manifest.categories)
    if match.missing:
        raise CheckpointError(
            f"{where}: its categories do not cover {class_source}: {len(match.missing)} of "
            f"{len(manifest.categories)} missing: {missing_names(match.missing)}; the model "
            f"knows {checkpoint.label_map.describe()}"
        )
    to_index = manifest.coco_to_contiguous
    return {index: to_index[cid] for index, cid in match.index_to_id.items()}


def build_eval_model(
    checkpoint: LoadedCheckpoint,
    *,
    inference_args: Mapping[str, Any],
    fallback_args: Mapping[str, Any] | None = None,
) -> MaskRCNN:
    """The checkpoint's model in eval mode, its weights loaded strictly.

    The architecture comes from the checkpoint's ``model_args`` (``fallback_args``, the
    config's, for a checkpoint that records none); ``inference_args`` (``INFERENCE_ARGS``:
    the test resize and memory format) override it, so that the model does not resize the
    loader's images a second time. Which outputs serve which of the data's categories is
    :func:`dataset_labels`' business."""
    where = f"checkpoint {checkpoint.path}"
    args = checkpoint.model_args if checkpoint.model_args is not None else fallback_args
    if args is None:
        raise CheckpointError(f"{where}: records no model_args and no config gives them")
    args = dict(args)
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
