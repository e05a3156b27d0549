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
    BoxCoder,
    ProposalMatcher,
    clip_boxes_to_image,
    nonsmall_box_mask,
)
from .fixed_size import Proposals, as_proposals, compact, nms_keep_per_image, top_kept
from .losses import (
    PADDING_LOGIT,
    BoxLoss,
    average_across_ranks,
    box_regression_loss,
    masked_mean,
    sigmoid_focal_loss,
)
from .sampling import BalancedSampler

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
        # The mask loss on all padded positive slots (no host read) or on the positives alone
        # (one read a step, cheaper on a CPU): see _mask_loss.
        self.pad_mask_positives = False

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
        proposals: Proposals | list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """``proposals``: the RPN's padded :class:`Proposals`, or a list of per-image boxes."""
        proposals = as_proposals(proposals)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return [], self._train_forward(features, proposals, targets)
        return self._inference(features, proposals, image_sizes), {}

    # ---- training ----

    def _sample(self, proposals: Proposals, targets: list[dict[str, Tensor]]) -> dict:
        """Per image, fixed-size samples of proposals and ground-truth boxes: [S_i] slots with
        the positives first (at most ``max_pos`` of them, so all among the first ``max_pos``
        slots) and masks ``valid`` and ``positive``; padding proposals are never sampled."""
        sample: dict[str, list] = {k: [] for k in ("boxes", "labels", "valid", "positive", "gt")}
        sample["max_pos"] = []
        for boxes, valid, target in zip(proposals.boxes, proposals.valid, targets, strict=True):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            candidates = torch.cat([boxes, gt_boxes.to(boxes.dtype)])
            matches = self.matcher(gt_boxes, candidates)
            image_labels = gt_labels[matches.clamp(min=0)] if gt_boxes.shape[0] else matches
            image_labels = torch.where(matches >= 0, image_labels, 0)
            ignored = matches == -2
            if valid.shape[0]:
                ignored = ignored | torch.cat([~valid, valid.new_zeros(gt_boxes.shape[0])])
            image_labels = image_labels.masked_fill(ignored, -1)
            index, positive, sampled = self.sampler(image_labels)
            sample["boxes"].append(candidates[index])
            sample["labels"].append(torch.where(positive, image_labels[index], 0))
            sample["valid"].append(sampled)
            sample["positive"].append(positive)
            sample["gt"].append(matches[index].clamp(min=0))
            sample["max_pos"].append(self.sampler.sizes(candidates.shape[0])[1])
        return sample

    def _train_forward(
        self, features: list[Tensor], proposals: Proposals, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        sample = self._sample(proposals, targets)
        regression_targets = []
        for boxes, gt, positive, target in zip(
            sample["boxes"], sample["gt"], sample["positive"], targets, strict=True
        ):
            gt_boxes = target["boxes"]
            matched = gt_boxes[gt] if gt_boxes.shape[0] else boxes  # finite either way
            encoded = self.box_coder.encode(matched.to(boxes.dtype), boxes)
            regression_targets.append(torch.where(positive[:, None], encoded, 0.0))
        rois = rois_from_boxes(sample["boxes"])
        box_features = self.box_head(self._pool(features, rois, 7))
        class_logits, box_deltas = self.box_predictor(box_features)
        class_logits, box_deltas = class_logits.float(), box_deltas.float()  # mixed precision
        losses = self._box_losses(
            class_logits,
            box_deltas,
            torch.cat(sample["labels"]),
            torch.cat(sample["valid"]),
            torch.cat(sample["positive"]),
            torch.cat(regression_targets),
        )
        losses["loss_mask"] = self._mask_loss(features, sample, targets)
        return losses

    def _box_losses(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        labels: Tensor,
        valid: Tensor,
        positive: Tensor,
        regression_targets: Tensor,
    ) -> dict[str, Tensor]:
        # Every count a device tensor: normalised by the sampled (valid) slots, as a mean over
        # an index-list sample would be.
        num_samples = valid.sum().clamp(min=1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        deltas = box_deltas.reshape(-1, self.num_classes, 4)[rows, labels]
        deltas = torch.where(positive[:, None], deltas, regression_targets)
        box_loss = (
            box_regression_loss(deltas, regression_targets, self.box_loss, self.smooth_l1_beta)
            / num_samples
        )
        if self.classifier_loss == "focal":
            # Sigmoid over the foreground classes; background is the all-zeros target.
            one_hot = F.one_hot(labels, self.num_classes)[:, 1:].to(class_logits.dtype)
            # Normalised by the positives of the whole global batch (averaged over ranks), so
            # the gradient does not depend on how the batch is split across processes.
            num_pos = average_across_ranks(positive.sum().to(class_logits.dtype))
            classifier_loss = sigmoid_focal_loss(
                torch.where(valid[:, None], class_logits, PADDING_LOGIT),
                one_hot,
                self.focal_alpha,
                self.focal_gamma,
                "sum",
            ) / num_pos.clamp(min=1.0)
        else:
            ce = F.cross_entropy(class_logits, labels, reduction="none")
            classifier_loss = masked_mean(ce, valid)
        return {"loss_classifier": classifier_loss, "loss_box_reg": box_loss}

    def _mask_loss(
        self, features: list[Tensor], sample: dict, targets: list[dict[str, Tensor]]
    ) -> Tensor:
        # The positives' slots: the first max_pos of each image's sample, padded.
        boxes, labels, positive, mask_targets = [], [], [], []
        for image, target in enumerate(targets):
            k = sample["max_pos"][image]
            image_boxes, gt = sample["boxes"][image][:k], sample["gt"][image][:k]
            boxes.append(image_boxes)
            labels.append(sample["labels"][image][:k])
            positive.append(sample["positive"][image][:k])
            mask_targets.append(self._mask_targets(image_boxes, gt, target["masks"]))
        rois = rois_from_boxes(boxes)
        labels_t, positive_t, targets_t = (
            torch.cat(labels),
            torch.cat(positive),
            torch.cat(mask_targets),
        )
        # Padding measured (2026-12-06, R50-FPN from benchmarks/syncs.py's models, 2 images of
        # 512x512, one CPU thread, training step forward and backward): the mask head ran on 6
        # positives compacted against 256 padded slots (128 an image), 25 s against 59 s a step.
        # The mask head is the costliest per-RoI part of a CPU step, so the positives are
        # compacted after one host read of their count (one sync a step, whatever the batch).
        # ``pad_mask_positives = True`` gives the read-free padded form (e.g. for CUDA graphs).
        if not self.pad_mask_positives:
            count = int(positive_t.sum())  # the one host read of a training step
            index = compact(positive_t[None], count)[0][0]
            rois, labels_t, targets_t = rois[index], labels_t[index], targets_t[index]
            positive_t = positive_t[index]
        mask_logits = self.mask_head(self._pool(features, rois, 14)).float()
        if rois.shape[0] == 0:
            return mask_logits.sum() * 0.0
        logits = mask_logits[torch.arange(rois.shape[0], device=rois.device), labels_t]
        bce = F.binary_cross_entropy_with_logits(logits, targets_t, reduction="none")
        return masked_mean(bce.mean(dim=(1, 2)), positive_t)

    def _mask_targets(self, boxes: Tensor, gt: Tensor, masks: Tensor) -> Tensor:
        """[K, M, M] targets: each box's matched ground-truth mask, pooled in its box."""
        size = 2 * 14
        if masks.shape[0] == 0:
            return boxes.new_zeros((boxes.shape[0], size, size))
        # Every ground-truth mask is converted (no unique: its size would be the data's).
        gt_masks = masks[:, None].to(boxes.dtype)
        mask_rois = torch.cat([gt[:, None].to(boxes.dtype), boxes], dim=1)
        return ops.roi_align(
            gt_masks,
            mask_rois,
            (size, size),
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=self.pooler_aligned,
        )[:, 0]

    # ---- inference ----

    def _inference(
        self, features: list[Tensor], proposals: Proposals, image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        num_images, num_proposals = proposals.valid.shape
        rois = rois_from_boxes(list(proposals.boxes))
        class_logits, box_deltas = self.box_predictor(self.box_head(self._pool(features, rois, 7)))
        # Decode and score in float32 even under mixed precision (bf16 would round boxes).
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        boxes = self.box_coder.decode(box_deltas, rois[:, 1:])  # [R, num_classes, 4]
        if self.classifier_loss == "focal":
            scores = torch.sigmoid(class_logits)  # foreground classes only
        else:
            scores = F.softmax(class_logits, -1)[:, 1:]
        num_fg = self.num_classes - 1
        boxes = boxes[:, 1:].reshape(num_images, num_proposals, num_fg, 4)
        boxes = torch.stack(
            [clip_boxes_to_image(b, size) for b, size in zip(boxes, image_sizes, strict=True)]
        ).reshape(num_images, -1, 4)
        scores = scores.reshape(num_images, -1)
        labels = torch.arange(1, self.num_classes, device=scores.device).repeat(num_proposals)
        candidate = (
            (scores > self.score_thresh)
            & nonsmall_box_mask(boxes.reshape(-1, 4), MIN_DETECTION_SIZE).view_as(scores)
            & proposals.valid[:, :, None].expand(-1, -1, num_fg).reshape(num_images, -1)
        )
        # One host read: the most candidates of an image, which sizes the NMS input (all the
        # candidates, in their order: exact, and no NMS over the padded boxes of a GPU run).
        size = int(candidate.sum(dim=1).max()) if candidate.numel() else 0
        index, valid = compact(candidate, size)
        boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        scores, labels = scores.gather(1, index), labels[index]
        keep = nms_keep_per_image(boxes, scores, self.nms_thresh, torch.where(valid, labels, -1))
        order, kept = top_kept(scores, keep, self.detections_per_image)
        # The outputs cut to size: one read of the per-image counts (kept first in each row).
        counts = kept.sum(dim=1).tolist()
        detections = []
        for i, count in enumerate(counts):
            o = order[i, :count]
            detections.append(
                {"boxes": boxes[i, o], "scores": scores[i, o], "labels": labels[i, o]}
            )
        mask_rois = rois_from_boxes([d["boxes"] for d in detections])
        mask_logits = self.mask_head(self._pool(features, mask_rois, 14)).float()
        mask_probs = torch.sigmoid(
            mask_logits[
                torch.arange(mask_rois.shape[0], device=mask_rois.device),
                torch.cat([d["labels"] for d in detections]),
            ]
        )[:, None]
        for detection, probs in zip(detections, mask_probs.split(counts), strict=True):
            detection["masks"] = probs
        return detections
