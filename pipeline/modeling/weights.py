"""Loading weights into a built model: lenient initialisation (``train.init_from``) and the
strict load of a resumed run.

:func:`load_init_weights` accepts

- our checkpoint (``{"model": state, "model_args": ...}``, e.g. ``MaskRCNN.save_checkpoint``
  or a training checkpoint; a ``module.`` prefix of a DDP wrapper is removed; DeepSpeed's
  ``{"module": state}`` works too),
- a torchvision ``maskrcnn_resnet50_fpn`` converted by ``launch/convert_torchvision.py`` (or
  its raw state dict, converted here), of any class count,
- a torchvision ImageNet ResNet state dict (``conv1.weight``, ``layer1.0.bn1.running_mean``,
  ``fc.weight`` ...), which goes into ``backbone.body`` only.

Every tensor that fits is loaded; the others are skipped with a reason (another shape, e.g.
the class-specific predictors of another class count; a key the model does not have; a
BatchNorm of the file where the model has a GroupNorm ...), and the model's tensors that got
nothing keep their fresh initialisation. The :class:`InitReport` says which is which.

The class-specific predictors (classifier, box regression, mask logits) are taken row by
row when the file says what its outputs mean (a checkpoint's ``label_map``; torchvision's
91-output COCO model) and the model's categories are given: the rows of the categories they
share, matched by id and name (:func:`~pipeline.modeling.label_map.match_categories`), go
to the model's rows of those categories, so that a COCO model started on a dataset of some
COCO categories keeps what it knows of them; the other rows keep their fresh init.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .label_map import LABEL_MAP_KEY, LabelMap, LabelMapError, match_categories
from .mask_rcnn import MaskRCNN

# How many names each summary line shows.
SUMMARY_NAMES = 4
# Keys of a checkpoint dict that may hold the state dict, in order of preference.
STATE_KEYS = ("model", "state_dict", "module")
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
# The class-specific tensors: rows per class (the classifier's may lack the background row
# under the focal loss; the box regression has 4 rows per class).
PREDICTOR_KEYS = tuple(
    f"roi_heads.{module}.{name}"
    for module in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.logits")
    for name in ("weight", "bias")
)


@dataclass
class InitReport:
    """What :func:`load_init_weights` did: model keys ``loaded``, model keys left ``new``
    (fresh initialisation), file keys ``skipped`` with the reason."""

    path: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # Constructor arguments recorded in the file that differ from the model's (file, model).
    differing_args: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    categories: str | None = None
    """Which categories' predictor rows came from the file, when matched by label map."""

    def summary_lines(self) -> list[str]:
        """Three lines: loaded, new, skipped (and one on the categories when matched)."""
        new = _first(self.new)
        skipped = _first([f"{key} ({reason})" for key, reason in self.skipped.items()])
        lines = [
            f"loaded {len(self.loaded)} tensors ({self.kind})",
            f"new {len(self.new)} (fresh init){': ' + new if new else ''}",
            f"skipped {len(self.skipped)}{': ' + skipped if skipped else ''}",
        ]
        if self.categories:
            lines.append(f"predictor rows: {self.categories}")
        return lines


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:SUMMARY_NAMES])
    if len(names) > SUMMARY_NAMES:
        shown += f", ... (+{len(names) - SUMMARY_NAMES} more)"
    return shown


def _shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


def _strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Without the ``module.`` prefix a DDP (or DeepSpeed) wrapper puts on every key."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def read_state_dict(
    path: str | os.PathLike,
) -> tuple[dict[str, Tensor], dict[str, Any] | None, Any]:
    """The state dict held by the file at ``path``, the ``model_args`` and the label map
    (as recorded: a list of dicts) recorded with it, if any; a ValueError naming the path
    when the file holds none."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors come in many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a PyTorch weights file ({reason})") from err
    state, model_args, label_map = loaded, None, None
    if isinstance(loaded, Mapping):
        for key in STATE_KEYS:
            if isinstance(loaded.get(key), Mapping):
                state = loaded[key]
                break
        if isinstance(loaded.get("model_args"), Mapping):
            model_args = dict(loaded["model_args"])
        label_map = loaded.get(LABEL_MAP_KEY)
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"{path}: not a state dict (expected a mapping of names to tensors, or a checkpoint "
            f"holding one under {' / '.join(repr(k) for k in STATE_KEYS)}); got "
            f"{type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"{path}: not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return _strip_module_prefix(state), model_args, label_map


def _our_names(
    state: dict[str, Tensor], path: str | os.PathLike
) -> tuple[str, dict[str, str | None]]:
    """(kind of file, the model's name of each file key, None for keys that have none)."""
    if "backbone.body.conv1.weight" in state:
        if any(key.startswith(("backbone.fpn.inner_blocks.", "rpn.head.conv.0.")) for key in state):
            return "torchvision Mask R-CNN", {
                key: MaskRCNN.convert_torchvision_key(key) for key in state
            }
        return "Mask R-CNN checkpoint", {key: key for key in state}
    if "conv1.weight" in state and any(key.startswith("layer1.") for key in state):
        return "ImageNet ResNet", {key: f"backbone.body.{key}" for key in state}
    first = ", ".join(list(state)[:3])
    raise ValueError(
        f"{path}: neither a Mask R-CNN checkpoint nor an ImageNet ResNet state dict "
        f"(first keys: {first})"
    )


def _skip_reason(
    key: str,
    value: Tensor,
    own: dict[str, Tensor],
    modules: dict[str, nn.Module],
    state: Mapping[str, Tensor],
) -> str | None:
    """Why the file's ``key`` (in our naming) cannot be loaded, or None when it can."""
    prefix, _, name = key.rpartition(".")
    module = modules.get(prefix)
    file_has_bn = f"{prefix}.running_var" in state
    # Any BatchNorm kind (also SyncBatchNorm after the engine's conversion) has statistics.
    model_has_bn = getattr(module, "running_var", None) is not None
    if isinstance(module, nn.GroupNorm) and file_has_bn:
        return "model uses GroupNorm"
    if model_has_bn and not file_has_bn:
        return "file has no BatchNorm statistics here (GroupNorm?)"
    if isinstance(module, FrozenBatchNorm2d) and name == "num_batches_tracked":
        return "FrozenBatchNorm keeps no batch count"
    if key.startswith("backbone.body.fc."):
        return "ImageNet classifier, not part of the detector"
    if key not in own:
        return "not in the model"
    if value.shape != own[key].shape:
        return f"shape {_shape(value)} vs model {_shape(own[key])}"
    return None


def _file_label_map(kind: str, state: dict, recorded: Any, path) -> LabelMap | None:
    """What the file's outputs mean: its recorded map, or COCO's for torchvision's
    91-output model; None when unknown."""
    boxes = state.get("roi_heads.box_predictor.bbox_pred.weight")
    if boxes is None:
        return None
    classes = boxes.shape[0] // 4  # 4 rows a class, background included, for any classifier
    if recorded is not None:
        try:
            return LabelMap.from_json(recorded, classes, str(path))
        except LabelMapError:
            return None  # unusable: the predictors go by shape, as without a map
    coco = LabelMap.torchvision_coco()
    if kind == "torchvision Mask R-CNN" and classes == coco.num_classes:
        return coco
    return None


def _class_rows(key: str, index: int, num_classes: int, rows: int) -> list[int]:
    """The rows of class ``index`` in the predictor tensor ``key`` of ``rows`` rows."""
    if rows == 4 * num_classes:
        return list(range(4 * index, 4 * index + 4))
    if rows == num_classes:
        return [index]
    if rows == num_classes - 1 and index > 0:  # focal classifier: no background row
        return [index - 1]
    return []


def _remap_predictors(
    converted: dict[str, Tensor], own: dict[str, Tensor], file_map: LabelMap, label_map: LabelMap
) -> tuple[dict[str, Tensor], str]:
    """The model's predictor tensors with the rows of the shared categories (and of the
    background) taken from the file's, and a one-line account of the categories."""
    match = match_categories(file_map, [{"id": c.id, "name": c.name} for c in label_map.categories])
    to_model = {c.id: c.index for c in label_map.categories}
    pairs = [(0, 0)] + [(index, to_model[cid]) for index, cid in match.index_to_id.items()]
    tensors = {}
    for key in PREDICTOR_KEYS:
        if key not in converted or key not in own:
            continue
        mine, theirs = own[key].clone(), converted[key]
        if mine.shape[1:] != theirs.shape[1:]:
            continue  # another head width: nothing to take
        for file_index, model_index in pairs:
            source = _class_rows(key, file_index, file_map.num_classes, theirs.shape[0])
            target = _class_rows(key, model_index, label_map.num_classes, mine.shape[0])
            if len(source) == len(target) and source:
                mine[target] = theirs[source].to(mine.dtype)
        tensors[key] = mine
    kept = len(match.index_to_id)
    return tensors, f"kept {kept} of {len(label_map.categories)} categories: {match.summary()}"


def load_init_weights(
    model: nn.Module, path: str | os.PathLike, *, label_map: LabelMap | None = None
) -> InitReport:
    """Initialise ``model`` (a :class:`MaskRCNN`) from the weights file at ``path`` with every
    tensor that fits; see the module docstring for the accepted files. ``label_map``: the
    model's categories (the train shards'), to take the predictor rows by category. Raises
    ValueError naming the path for a file that holds no state dict or of which nothing
    fits."""
    state, recorded_args, recorded_map = read_state_dict(path)
    kind, names = _our_names(state, path)
    converted = {names[key]: value for key, value in state.items() if names[key] is not None}
    own = model.state_dict()
    modules = dict(model.named_modules())
    report = InitReport(path=str(path), kind=kind)
    file_map = _file_label_map(kind, converted, recorded_map, path)
    by_category = {}
    if file_map is not None and label_map is not None:
        by_category, report.categories = _remap_predictors(converted, own, file_map, label_map)
    to_load = {}
    for file_key, value in state.items():
        key = names[file_key]
        if key in by_category:
            to_load[key] = by_category[key]
            continue
        reason = (
            "BatchNorm bookkeeping"
            if key is None
            else _skip_reason(key, value, own, modules, converted)
        )
        if reason is None:
            to_load[key] = value
        else:
            report.skipped[file_key] = reason
    if not to_load:
        raise ValueError(
            f"{path}: no tensor of this {kind} fits the model "
            f"({len(report.skipped)} skipped, e.g. {_first(list(report.skipped))})"
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered above
    report.loaded = sorted(to_load)
    report.new = sorted(set(own) - set(to_load))
    model_args = getattr(model, "model_args", {})
    for name, value in (recorded_args or {}).items():
        if name in model_args and model_args[name] != value:
            report.differing_args[name] = (value, model_args[name])
    return report


def load_strict_state(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` exactly (resuming a run): every missing, unexpected or
    mis-shaped tensor is named, with the shapes and ``source``, in one RuntimeError."""
    state = _strip_module_prefix(state)
    own = model.state_dict()
    problems = [f"missing {key} (model {_shape(own[key])})" for key in own if key not in state]
    problems += [
        f"unexpected {key} (checkpoint {_shape(value)})"
        for key, value in state.items()
        if key not in own
    ]
    problems += [
        f"{key}: checkpoint {_shape(value)} vs model {_shape(own[key])}"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    if problems:
        shown = "; ".join(problems[:SUMMARY_NAMES])
        more = f"; ... (+{len(problems) - SUMMARY_NAMES} more)" if len(problems) > 4 else ""
        raise RuntimeError(
            f"{source}: the checkpoint does not match the model ({len(problems)} "
            f"differences): {shown}{more}"
        )
    model.load_state_dict(state, strict=True)
