"""The Mask R-CNN model: torchvision's calling convention, explicit constructor arguments,
checkpoints that carry those arguments, and loading of torchvision ``maskrcnn_resnet50_fpn``
weights."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import ResNetFPN
from .boxes import DEFAULT_BBOX_XFORM_CLIP
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .transform import ImagePreprocessor

# torchvision state-dict key patterns -> ours (applied in order; unmatched keys are kept).
_TORCHVISION_KEY_MAP = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"backbone.fpn.lateral_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"backbone.fpn.output_convs.\1."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.box_deltas."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"roi_heads.mask_head.convs.\1."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.logits."),
]

# torchvision's maskrcnn_resnet50_fpn (v1) settings, for MaskRCNN.from_torchvision.
TORCHVISION_MODEL_ARGS: dict[str, Any] = {
    "depth": 50,
    "frozen_stages": 2,  # torchvision's trainable_backbone_layers=3
    "fpn_channels": 256,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.7,
    "rpn_fg_iou_thresh": 0.7,
    "rpn_bg_iou_thresh": 0.3,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "rpn_score_thresh": 0.0,
    "rpn_min_size": 1e-3,
    "roi_fg_iou_thresh": 0.5,
    "roi_bg_iou_thresh": 0.5,
    "roi_batch_size_per_image": 512,
    "roi_positive_fraction": 0.25,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "detections_per_image": 100,
    "box_head_dim": 1024,
    "mask_head_channels": 256,
    "pooler_sampling_ratio": 2,
    "pooler_aligned": False,  # the legacy RoIAlign sampling torchvision's weights expect
    "pooler_mode": "bilinear",
    "rpn_box_weights": [1.0, 1.0, 1.0, 1.0],
    "roi_box_weights": [10.0, 10.0, 5.0, 5.0],
    "bbox_xform_clip": DEFAULT_BBOX_XFORM_CLIP,
    "min_size_train": [800],
    "max_size_train": 1333,
    "min_size_test": 800,
    "max_size_test": 1333,
    "pixel_mean": [0.485, 0.456, 0.406],
    "pixel_std": [0.229, 0.224, 0.225],
    "size_divisibility": 32,
    "norm": "frozen_bn",
    "fpn_norm": "none",
    "head_norm": "none",
}


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet-FPN backbone.

    ``model(images, targets)`` in training mode takes a list of [3, H, W] float 0-1 images and
    a list of dicts (``boxes`` float [N, 4], ``labels`` int64 [N] in 1..num_classes-1,
    ``masks`` uint8 [N, H, W]) and returns the losses ``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg`` and ``loss_mask``.
    ``model(images)`` in eval mode returns one dict per image with ``boxes`` (xyxy, original
    image size), ``labels``, ``scores`` and ``masks`` ([N, 1, H, W] probabilities).

    Every constructor argument is explicit; ``self.model_args`` records them so a checkpoint
    can rebuild the model (:meth:`save_checkpoint`, :meth:`from_checkpoint`).

    Normalization: ``norm`` of the ResNet (``frozen_bn``, ``bn``, ``sync_bn``, ``gn``; see
    :mod:`.backbone`; for ``sync_bn`` the model builds ``nn.BatchNorm2d`` and the training
    engine applies ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP), ``fpn_norm`` and
    ``head_norm`` (``none`` or ``gn``; ``head_norm="gn"`` makes the box head detectron2's
    4conv1fc). The defaults are torchvision's architecture.

    Randomness in training (the RPN and RoI samplers' permutations, the choice of a training
    size) comes from the generator given to :meth:`set_generator`, or from torch's global RNG
    when none is set.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        depth: int = 50,
        frozen_stages: int = 1,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        rpn_min_size: float = 1e-3,
        rpn_objectness_loss: str = "bce",
        rpn_box_loss: str = "smooth_l1",
        rpn_smooth_l1_beta: float = 1.0 / 9.0,
        roi_fg_iou_thresh: float = 0.5,
        roi_bg_iou_thresh: float = 0.5,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        classifier_loss: str = "ce",
        roi_box_loss: str = "smooth_l1",
        roi_smooth_l1_beta: float = 1.0 / 9.0,
        box_head_dim: int = 1024,
        mask_head_channels: int = 256,
        pooler_sampling_ratio: int = 2,
        pooler_aligned: bool = True,
        pooler_mode: str = "bilinear",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        rpn_box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        roi_box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
        min_size_train: Sequence[int] = (800,),
        max_size_train: int = 1333,
        min_size_test: int = 800,
        max_size_test: int = 1333,
        pixel_mean: Sequence[float] = (0.485, 0.456, 0.406),
        pixel_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisibility: int = 32,
        channels_last: bool = True,
        norm: str = "frozen_bn",
        fpn_norm: str = "none",
        head_norm: str = "none",
    ) -> None:
        super().__init__()
        self.model_args = {
            key: list(value) if isinstance(value, (tuple, list)) else value
            for key, value in locals().items()
            if key not in ("self", "__class__")
        }
        if len(anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs one size per FPN level P2..P6 (5)")
        self.transform = ImagePreprocessor(
            min_size_train=min_size_train,
            max_size_train=max_size_train,
            min_size_test=min_size_test,
            max_size_test=max_size_test,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            size_divisibility=size_divisibility,
        )
        self.backbone = ResNetFPN(
            depth=depth,
            frozen_stages=frozen_stages,
            fpn_channels=fpn_channels,
            norm=norm,
            fpn_norm=fpn_norm,
            channels_last=channels_last,
        )
        self.rpn = RegionProposalNetwork(
            in_channels=fpn_channels,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            post_nms_top_n_train=rpn_post_nms_top_n_train,
            post_nms_top_n_test=rpn_post_nms_top_n_test,
            nms_thresh=rpn_nms_thresh,
            fg_iou_thresh=rpn_fg_iou_thresh,
            bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=rpn_positive_fraction,
            score_thresh=rpn_score_thresh,
            min_size=rpn_min_size,
            objectness_loss=rpn_objectness_loss,
            box_loss=rpn_box_loss,
            smooth_l1_beta=rpn_smooth_l1_beta,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            box_weights=rpn_box_weights,
            bbox_xform_clip=bbox_xform_clip,
        )
        self.roi_heads = RoIHeads(
            in_channels=fpn_channels,
            num_classes=num_classes,
            fg_iou_thresh=roi_fg_iou_thresh,
            bg_iou_thresh=roi_bg_iou_thresh,
            batch_size_per_image=roi_batch_size_per_image,
            positive_fraction=roi_positive_fraction,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_image=detections_per_image,
            classifier_loss=classifier_loss,
            box_loss=roi_box_loss,
            smooth_l1_beta=roi_smooth_l1_beta,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            box_head_dim=box_head_dim,
            mask_head_channels=mask_head_channels,
            pooler_sampling_ratio=pooler_sampling_ratio,
            pooler_aligned=pooler_aligned,
            pooler_mode=pooler_mode,
            box_weights=roi_box_weights,
            bbox_xform_clip=bbox_xform_clip,
            head_norm=head_norm,
        )
        if channels_last:
            # NHWC weights for the convolutions that see NHWC activations: with NCHW weights
            # every such convolution reorders its weight forward and backward and copies its
            # weight gradient back to NCHW (5-10% of a ResNet-18 training step on a CPU).
            self.backbone.to(memory_format=torch.channels_last)
            self.rpn.head.to(memory_format=torch.channels_last)
        self.generator: torch.Generator | None = None

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, image_sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        proposals, rpn_losses = self.rpn(features, batch.shape[-2:], image_sizes, targets)
        detections, roi_losses = self.roi_heads(features[:4], proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Draw every random choice of training from ``generator`` (None: the global RNG).

        The owner seeds it (per rank) and saves/restores ``generator.get_state()`` with its
        checkpoints; a CUDA generator keeps the draws on the device.
        """
        self.generator = generator
        self.transform.generator = generator
        self.rpn.sampler.generator = generator
        self.roi_heads.sampler.generator = generator

    # ---- checkpoints ----

    def checkpoint(
        self, source: str = "pipeline", label_map: list[dict] | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict: ``{"model": state_dict, "model_args": kwargs, "source": ...}``
        and, when given, ``"label_map"`` (see :mod:`~pipeline.modeling.label_map`)."""
        checkpoint = {
            "model": self.state_dict(),
            "model_args": dict(self.model_args),
            "source": source,
        }
        if label_map is not None:
            checkpoint["label_map"] = label_map
        return checkpoint

    def save_checkpoint(
        self, path: str | os.PathLike, source: str = "pipeline", label_map: list[dict] | None = None
    ) -> None:
        torch.save(self.checkpoint(source, label_map), path)

    @classmethod
    def from_checkpoint(cls, path_or_checkpoint: str | os.PathLike | Mapping[str, Any]) -> MaskRCNN:
        """Rebuild a model from a checkpoint file (or dict) with its recorded arguments."""
        checkpoint = (
            path_or_checkpoint
            if isinstance(path_or_checkpoint, Mapping)
            else torch.load(path_or_checkpoint, map_location="cpu", weights_only=True)
        )
        model = cls(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
        return model

    # ---- torchvision ----

    @staticmethod
    def convert_torchvision_key(key: str) -> str | None:
        """Our name of a torchvision ``maskrcnn_resnet50_fpn`` state-dict key (None for
        BatchNorm bookkeeping, which the frozen BatchNorm does not keep)."""
        if key.endswith("num_batches_tracked"):
            return None
        for pattern, replacement in _TORCHVISION_KEY_MAP:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        return key

    @classmethod
    def convert_torchvision_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rename a torchvision ``maskrcnn_resnet50_fpn`` state dict to ours."""
        converted = {}
        for key, value in state_dict.items():
            new_key = cls.convert_torchvision_key(key)
            if new_key is not None:
                converted[new_key] = value
        return converted

    @classmethod
    def torchvision_model_args(
        cls, state_dict: Mapping[str, Tensor], **overrides: Any
    ) -> dict[str, Any]:
        """Our constructor arguments reproducing torchvision's model of ``state_dict``
        (class count read from it)."""
        args = dict(TORCHVISION_MODEL_ARGS)
        args["num_classes"] = int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
        args["bbox_xform_clip"] = math.log(1000.0 / 16)
        args.update(overrides)
        return args

    @classmethod
    def from_torchvision(cls, state_dict: Mapping[str, Tensor], **overrides: Any) -> MaskRCNN:
        """Our model with torchvision ``maskrcnn_resnet50_fpn`` (v1) weights and settings
        (aligned=False pooling, its box coders and input sizes); ``overrides`` change
        constructor arguments (e.g. ``min_size_test``)."""
        model = cls(**cls.torchvision_model_args(state_dict, **overrides))
        model.load_state_dict(cls.convert_torchvision_state_dict(state_dict))
        return model
