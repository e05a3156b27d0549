"""RoI heads: proposal matching and sampling, the box head (2 FC, or 4 conv + 1 FC with
GroupNorm) and predictor, the mask head (4 convs + deconv, optionally with GroupNorm) and
predictor, their losses and the inference post-processing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops

from .backbone import group_norm
from .boxes import (
    DEFAULT_BBOX_XFORM_CLIP,
    BalancedSampler,
    BoxCoder,
    ProposalMatcher,
    clip_boxes_to_image,
    nonsmall_box_mask,
)
from .losses import BoxLoss, average_across_ranks, box_regression_loss, sigmoid_focal_loss

# FPN levels P2..P5 pooled by the RoI heads, and their strides' inverse.
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
# Detections narrower or lower than this (pixels) are dropped, as in torchvision.
MIN_DETECTION_SIZE = 1e-2


def rois_from_boxes(boxes: list[Tensor]) -> Tensor:
    """[K, 5] (batch index, x1, y1, x2, y2) from per-image box lists."""
    indices = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(indices), torch.cat(boxes)], dim=1)


class BoxHead(nn.Module):
    """Two fully connected layers (``fc6``, ``fc7``) with ReLU over the pooled features."""

    def __init__(self, *, in_features: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden_dim)
        self.fc7 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class ConvFCBoxHead(nn.Module):
    """detectron2's ``4conv1fc`` head: four 3x3 convolutions (no bias) + GroupNorm + ReLU over
    the pooled features, keeping their ``channels``, then one fully connected layer + ReLU."""

    def __init__(self, *, channels: int, resolution: int, hidden_dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(4)
        )
        where = f"the box head (fpn_channels={channels})"
        self.norms = nn.ModuleList(group_norm(channels, where) for _ in range(4))
        # Not named fc6: a 2fc head's fc6 has the same shape but another meaning.
        self.fc = nn.Linear(channels * resolution * resolution, hidden_dim)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_uniform_(self.fc.weight, a=1)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = norm(conv(x)).relu_()
        return F.relu(self.fc(x.flatten(1)))


class BoxPredictor(nn.Module):
    """Class logits and class-specific box deltas. ``num_class_logits`` is ``num_classes`` for
    the softmax classifier and ``num_classes - 1`` (foreground only) for the sigmoid focal one."""

    def __init__(self, *, in_features: int, num_classes: int, num_class_logits: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_class_logits)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        # Sigmoid classifier: start from RetinaNet's foreground prior p = 0.01.
        prior_bias = -4.59511985013459 if num_class_logits < num_classes else 0.0
        nn.init.constant_(self.cls_score.bias, prior_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """Four 3x3 conv + ReLU, a stride-2 deconvolution + ReLU and a 1x1 conv giving one mask
    logit map per class (28x28 from 14x14 pooled features). ``norm="gn"`` puts a GroupNorm
    after each of the four convolutions (which then have no bias)."""

    def __init__(
        self, *, in_channels: int, channels: int, num_classes: int, norm: str = "none"
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=bias)
            for i in range(4)
        )
        self.norms: nn.ModuleList | None = None
        if norm == "gn":
            where = f"the mask head (mask_head_channels={channels})"
            self.norms = nn.ModuleList(group_norm(channels, where) for _ in range(4))
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        # Small initial logits (detectron2): torchvision's kaiming init of this 1x1 layer starts
        # the mask loss several times above log(2).
        nn.init.normal_(self.logits.weight, std=0.001)
        nn.init.zeros_(self.logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        for index, conv in enumerate(self.convs):
            x = conv(x)
            x = F.relu(x if self.norms is None else self.norms[index](x))
        return self.logits(F.relu(self.deconv(x)))


class RoIHeads(nn.Module):
    """Box and mask branches. In training returns ``loss_classifier``, ``loss_box_reg`` and
    ``loss_mask``; in inference per-image detections with 28x28 mask probabilities."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        classifier_loss: str = "ce",
        box_loss: BoxLoss = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_head_dim: int = 1024,
        mask_head_channels: int = 256,
        pooler_sampling_ratio: int = 2,
        pooler_aligned: bool = True,
        pooler_mode: str = "bilinear",
        box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
        head_norm: str = "none",
    ) -> None:
        super().__init__()
        if classifier_loss not in ("ce", "focal"):
            raise ValueError(f"unknown classifier loss {classifier_loss!r}")
        if head_norm not in ("none", "gn"):
            raise ValueError(f"unknown head norm {head_norm!r}; use 'none' or 'gn'")
        self.num_classes = num_classes
        self.classifier_loss = classifier_loss
        self.box_head: nn.Module = (
            BoxHead(in_features=in_channels * 7 * 7, hidden_dim=box_head_dim)
            if head_norm == "none"
            else ConvFCBoxHead(channels=in_channels, resolution=7, hidden_dim=box_head_dim)
        )
        self.box_predictor = BoxPredictor(
            in_features=box_head_dim,
            num_classes=num_classes,
            num_class_logits=num_classes - 1 if classifier_loss == "focal" else num_classes,
        )
        self.mask_head = MaskHead(
            in_channels=in_channels,
            channels=mask_head_channels,
            num_classes=num_classes,
            norm=head_norm,
        )
        self.matcher = ProposalMatcher(
            fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False
        )
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(box_weights, bbox_xform_clip)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.pooler_sampling_ratio = pooler_sampling_ratio
        self.pooler_aligned = pooler_aligned
        self.pooler_mode = pooler_mode

    def _pool(self, features: list[Tensor], rois: Tensor, size: int) -> Tensor:
        # The levels go as they are: the pooler reads channels_last (and NCHW) maps in place,
        # and hands back the gradients in the maps' own layout.
        return ops.multilevel_roi_align(
            features,
            rois,
            (size, size),
            sampling_ratio=self.pooler_sampling_ratio,
            aligned=self.pooler_aligned,
            mode=self.pooler_mode,
            spatial_scales=list(POOLER_SCALES[: len(features)]),
        )

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return [], self._train_forward(features, proposals, targets)
        return self._inference(features, proposals, image_sizes), {}

    # ---- training ----

    def _train_forward(
        self, features: list[Tensor], proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        sampled_boxes, labels, regression_targets, matched_gt = [], [], [], []
        for image_proposals, target in zip(proposals, targets, strict=True):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            candidates = torch.cat([image_proposals, gt_boxes.to(image_proposals.dtype)])
            matches = self.matcher(gt_boxes, candidates)
            image_labels = torch.zeros_like(matches)
            foreground = matches >= 0
            image_labels[foreground] = gt_labels[matches[foreground]]
            image_labels[matches == -2] = -1
            pos, neg = self.sampler(image_labels)
            keep = torch.cat([pos, neg])
            kept_boxes = candidates[keep]
            sampled_boxes.append(kept_boxes)
            labels.append(image_labels[keep])
            matched_gt.append(matches[pos])
            regression_targets.append(
                self.box_coder.encode(gt_boxes[matches[pos]], kept_boxes[: pos.numel()])
            )
        rois = rois_from_boxes(sampled_boxes)
        box_features = self.box_head(self._pool(features, rois, 7))
        class_logits, box_deltas = self.box_predictor(box_features)
        class_logits, box_deltas = class_logits.float(), box_deltas.float()  # mixed precision
        all_labels = torch.cat(labels)
        losses = self._box_losses(
            class_logits, box_deltas, all_labels, sampled_boxes, regression_targets
        )
        losses["loss_mask"] = self._mask_loss(features, sampled_boxes, labels, matched_gt, targets)
        return losses

    def _box_losses(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        labels: Tensor,
        sampled_boxes: list[Tensor],
        regression_targets: list[Tensor],
    ) -> dict[str, Tensor]:
        # Positives come first in each image's sample; gather them and their class's deltas.
        offsets, positives = 0, []
        for boxes, targets in zip(sampled_boxes, regression_targets, strict=True):
            positives.append(
                torch.arange(offsets, offsets + targets.shape[0], device=labels.device)
            )
            offsets += boxes.shape[0]
        pos = torch.cat(positives)
        num_samples = max(1, labels.numel())
        deltas = box_deltas.reshape(-1, self.num_classes, 4)[pos, labels[pos]]
        box_loss = (
            box_regression_loss(
                deltas, torch.cat(regression_targets), self.box_loss, self.smooth_l1_beta
            )
            / num_samples
        )
        if self.classifier_loss == "focal":
            # Sigmoid over the foreground classes; background is the all-zeros target.
            one_hot = torch.zeros_like(class_logits)
            one_hot[pos, labels[pos] - 1] = 1.0
            # Normalised by the positives of the whole global batch (averaged over ranks), so
            # the gradient does not depend on how the batch is split across processes.
            classifier_loss = sigmoid_focal_loss(
                class_logits, one_hot, self.focal_alpha, self.focal_gamma, "sum"
            ) / max(1.0, average_across_ranks(pos.numel()))
        elif labels.numel() > 0:
            classifier_loss = F.cross_entropy(class_logits, labels)
        else:
            classifier_loss = class_logits.sum() * 0.0
        return {"loss_classifier": classifier_loss, "loss_box_reg": box_loss}

    def _mask_loss(
        self,
        features: list[Tensor],
        sampled_boxes: list[Tensor],
        labels: list[Tensor],
        matched_gt: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        positive_boxes = [b[: m.numel()] for b, m in zip(sampled_boxes, matched_gt, strict=True)]
        positive_labels = torch.cat(
            [lab[: m.numel()] for lab, m in zip(labels, matched_gt, strict=True)]
        )
        rois = rois_from_boxes(positive_boxes)
        mask_logits = self.mask_head(self._pool(features, rois, 14)).float()
        if rois.shape[0] == 0:
            return mask_logits.sum() * 0.0
        size = mask_logits.shape[-1]
        mask_targets = []
        for boxes, matches, target in zip(positive_boxes, matched_gt, targets, strict=True):
            if matches.numel() == 0:
                continue
            # Only the matched objects' masks are converted to float (images may have hundreds).
            used, inverse = torch.unique(matches, return_inverse=True)
            gt_masks = target["masks"][used][:, None].to(boxes.dtype)
            mask_rois = torch.cat([inverse[:, None].to(boxes.dtype), boxes], dim=1)
            mask_targets.append(
                ops.roi_align(
                    gt_masks,
                    mask_rois,
                    (size, size),
                    spatial_scale=1.0,
                    sampling_ratio=-1,
                    aligned=self.pooler_aligned,
                )[:, 0]
            )
        logits = mask_logits[torch.arange(rois.shape[0], device=rois.device), positive_labels]
        return F.binary_cross_entropy_with_logits(logits, torch.cat(mask_targets))

    # ---- inference ----

    def _inference(
        self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        rois = rois_from_boxes(proposals)
        class_logits, box_deltas = self.box_predictor(self.box_head(self._pool(features, rois, 7)))
        # Decode and score in float32 even under mixed precision (bf16 would round boxes).
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        boxes = self.box_coder.decode(box_deltas, rois[:, 1:])  # [R, num_classes, 4]
        if self.classifier_loss == "focal":
            scores = torch.sigmoid(class_logits)  # foreground classes only
        else:
            scores = F.softmax(class_logits, -1)[:, 1:]
        boxes = boxes[:, 1:]
        detections = []
        counts = [p.shape[0] for p in proposals]
        for image_boxes, image_scores, image_size in zip(
            boxes.split(counts), scores.split(counts), image_sizes, strict=True
        ):
            image_boxes = clip_boxes_to_image(image_boxes, image_size).reshape(-1, 4)
            image_labels = torch.arange(1, self.num_classes, device=image_boxes.device)
            image_labels = image_labels.repeat(image_scores.shape[0])
            image_scores = image_scores.reshape(-1)
            keep = (image_scores > self.score_thresh) & nonsmall_box_mask(
                image_boxes, MIN_DETECTION_SIZE
            )
            keep = torch.where(keep)[0]
            image_boxes, image_scores, image_labels = (
                image_boxes[keep],
                image_scores[keep],
                image_labels[keep],
            )
            kept = ops.batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)
            kept = kept[: self.detections_per_image]
            detections.append(
                {
                    "boxes": image_boxes[kept],
                    "scores": image_scores[kept],
                    "labels": image_labels[kept],
                }
            )
        mask_rois = rois_from_boxes([d["boxes"] for d in detections])
        mask_logits = self.mask_head(self._pool(features, mask_rois, 14)).float()
        mask_probs = torch.sigmoid(
            mask_logits[
                torch.arange(mask_rois.shape[0], device=mask_rois.device),
                torch.cat([d["labels"] for d in detections]),
            ]
        )[:, None]
        for detection, probs in zip(
            detections, mask_probs.split([len(d["boxes"]) for d in detections]), strict=True
        ):
            detection["masks"] = probs
        return detections
