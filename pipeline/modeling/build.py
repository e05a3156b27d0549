"""The one place where the configuration is mapped to the model's constructor arguments."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from pipeline.config import Config

from .mask_rcnn import MaskRCNN


def model_args_from_config(cfg: Config) -> dict[str, Any]:
    """Explicit :class:`MaskRCNN` keyword arguments for ``cfg.model`` and ``cfg.input``."""
    m, inp = cfg.model, cfg.input
    rpn, roi = m.rpn, m.roi_heads
    return {
        "num_classes": m.num_classes,
        "depth": m.backbone.depth,
        "frozen_stages": m.backbone.frozen_stages,
        "fpn_channels": m.backbone.fpn_channels,
        "anchor_sizes": list(m.anchors.sizes),
        "aspect_ratios": list(m.anchors.aspect_ratios),
        "rpn_pre_nms_top_n_train": rpn.pre_nms_top_n_train,
        "rpn_pre_nms_top_n_test": rpn.pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": rpn.post_nms_top_n_train,
        "rpn_post_nms_top_n_test": rpn.post_nms_top_n_test,
        "rpn_nms_thresh": rpn.nms_thresh,
        "rpn_fg_iou_thresh": rpn.fg_iou_thresh,
        "rpn_bg_iou_thresh": rpn.bg_iou_thresh,
        "rpn_batch_size_per_image": rpn.batch_size_per_image,
        "rpn_positive_fraction": rpn.positive_fraction,
        "rpn_score_thresh": rpn.score_thresh,
        "rpn_min_size": rpn.min_size,
        "rpn_objectness_loss": rpn.objectness_loss,
        "rpn_box_loss": rpn.box_loss,
        "rpn_smooth_l1_beta": rpn.smooth_l1_beta,
        "roi_fg_iou_thresh": roi.fg_iou_thresh,
        "roi_bg_iou_thresh": roi.bg_iou_thresh,
        "roi_batch_size_per_image": roi.batch_size_per_image,
        "roi_positive_fraction": roi.positive_fraction,
        "box_score_thresh": roi.score_thresh,
        "box_nms_thresh": roi.nms_thresh,
        "detections_per_image": roi.detections_per_image,
        "classifier_loss": roi.classifier_loss,
        "roi_box_loss": roi.box_loss,
        "roi_smooth_l1_beta": roi.smooth_l1_beta,
        "box_head_dim": roi.box_head_dim,
        "mask_head_channels": roi.mask_head_channels,
        "pooler_sampling_ratio": roi.pooler_sampling_ratio,
        "pooler_aligned": roi.pooler_aligned,
        "pooler_mode": roi.pooler_mode,
        "focal_alpha": m.focal.alpha,
        "focal_gamma": m.focal.gamma,
        "min_size_train": list(inp.min_size_train),
        "max_size_train": inp.max_size_train,
        "min_size_test": inp.min_size_test,
        "max_size_test": inp.max_size_test,
        "pixel_mean": list(inp.pixel_mean),
        "pixel_std": list(inp.pixel_std),
        "size_divisibility": inp.size_divisibility,
        "channels_last": m.channels_last,
    }


def load_weights(model: MaskRCNN, path: str | os.PathLike) -> list[str]:
    """Load a checkpoint written by :meth:`MaskRCNN.save_checkpoint` or
    ``launch/convert_torchvision.py`` into ``model``.

    Parameters whose shape differs (e.g. the class-specific predictors of a COCO model loaded
    into a model with another class count) are skipped and returned, so a converted model can
    be fine-tuned; a key missing from either side is an error. Warns when the checkpoint was
    made with other numerics-relevant arguments (e.g. torchvision's aligned=False pooling).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint)
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP wrapper
        state = {key[len("module.") :]: value for key, value in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint {path}: missing keys {missing[:5]}, unexpected {unexpected[:5]}"
        )
    skipped = [k for k, v in state.items() if v.shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    recorded = checkpoint.get("model_args", {})
    differing = {
        k: (recorded[k], model.model_args.get(k))
        for k in recorded
        if k not in ("num_classes",) and recorded[k] != model.model_args.get(k)
    }
    if differing:
        warnings.warn(
            f"checkpoint {path} was saved with other model arguments (checkpoint, config): "
            f"{differing}",
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"checkpoint {path}: skipped parameters of another shape: {skipped}", stacklevel=2
        )
    return skipped


def build_model(cfg: Config) -> MaskRCNN:
    """The Mask R-CNN of ``cfg``, initialised from ``cfg.model.weights`` when set."""
    model = MaskRCNN(**model_args_from_config(cfg))
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    return model
