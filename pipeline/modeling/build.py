"""The one place where the configuration is mapped to the model's constructor arguments."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config, ConfigError

from .mask_rcnn import MaskRCNN


def resolve_num_classes(configured: int | str, num_classes: int | None) -> int:
    """The class count of the model: ``num_classes`` (what the data has, which the caller
    read) when given, else ``model.num_classes``, which then must be a number."""
    if num_classes is None:
        if configured == "auto":
            raise ConfigError(
                "model.num_classes=auto: the class count comes from the data; pass "
                "num_classes= (the shard manifest's num_classes) or set model.num_classes"
            )
        return int(configured)
    if configured != "auto" and int(configured) != num_classes:
        raise ConfigError(f"model.num_classes={configured} but num_classes={num_classes} given")
    return int(num_classes)


def model_args_from_config(cfg: Config, *, num_classes: int | None = None) -> dict[str, Any]:
    """Explicit :class:`MaskRCNN` keyword arguments for ``cfg.model`` and ``cfg.input``.
    ``num_classes`` (categories + background) is required when ``model.num_classes`` is
    ``auto``; the train and eval stages read it from the shard manifest."""
    m, inp = cfg.model, cfg.input
    rpn, roi = m.rpn, m.roi_heads
    return {
        "num_classes": resolve_num_classes(m.num_classes, num_classes),
        "depth": m.backbone.depth,
        "frozen_stages": m.backbone.frozen_stages,
        "fpn_channels": m.backbone.fpn_channels,
        "norm": m.backbone.norm,
        "fpn_norm": m.fpn_norm,
        "head_norm": m.head_norm,
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


def build_model(cfg: Config, *, num_classes: int | None = None) -> MaskRCNN:
    """The freshly initialised Mask R-CNN of ``cfg`` (``num_classes`` as for
    :func:`model_args_from_config`). Weights are the train stage's business
    (``train.init_from`` through :func:`~pipeline.modeling.weights.load_init_weights`, resume
    through :func:`~pipeline.modeling.weights.load_strict_state`)."""
    return MaskRCNN(**model_args_from_config(cfg, num_classes=num_classes))
