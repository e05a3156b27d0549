"""Region proposal network: anchors, head, proposal selection and losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import (
    DEFAULT_BBOX_XFORM_CLIP,
    BoxCoder,
    ProposalMatcher,
    clip_boxes_to_image,
    nonsmall_box_mask,
)
from .conv import Conv2d
from .fixed_size import Proposals, nms_keep_per_image, top_kept
from .losses import (
    PADDING_LOGIT,
    BoxLoss,
    average_across_ranks,
    box_regression_loss,
    masked_mean,
    sigmoid_focal_loss,
)
from .sampling import BalancedSampler


class AnchorGenerator(nn.Module):
    """One anchor size per feature level and the same aspect ratios (height / width) on every
    level; anchors are laid out (y, x, anchor) per level, exactly as torchvision's generator
    (including its stride = padded image size // feature size)."""

    def __init__(self, *, sizes: Sequence[int], aspect_ratios: Sequence[float]) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.aspect_ratios = [float(a) for a in aspect_ratios]
        self.num_anchors_per_location = len(self.aspect_ratios)
        cell_anchors = [self._cell_anchors(size) for size in self.sizes]
        self.register_buffer("cell_anchors", torch.stack(cell_anchors), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    def _cell_anchors(self, size: int) -> Tensor:
        scales = torch.as_tensor([size], dtype=torch.float32)
        ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]) -> Tensor:
        """Anchors [sum(H*W*A), 4] for a padded batch of ``image_size`` (H, W)."""
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature levels for {len(self.sizes)} sizes")
        device = self.cell_anchors.device
        key = (tuple(image_size), tuple(tuple(s) for s in feature_sizes), device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        anchors = []
        for (grid_h, grid_w), base in zip(feature_sizes, self.cell_anchors, strict=True):
            stride_h = int(image_size[0]) // int(grid_h)
            stride_w = int(image_size[1]) // int(grid_w)
            shifts_x = torch.arange(grid_w, dtype=torch.int64, device=device) * stride_w
            shifts_y = torch.arange(grid_h, dtype=torch.int64, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        result = torch.cat(anchors)
        if len(self._cache) > 16:  # bounded: one entry per distinct padded batch shape
            self._cache.clear()
        self._cache[key] = result
        return result

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for the objectness logit and the 4 box deltas of each
    anchor, shared across levels."""

    def __init__(
        self, *, in_channels: int, num_anchors: int, objectness_bias_init: float = 0.0
    ) -> None:
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.box_deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for conv in (self.conv, self.objectness, self.box_deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.objectness.bias, objectness_bias_init)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Objectness logits [N, sum(H*W*A)] and deltas [N, sum(H*W*A), 4], levels
        concatenated in anchor order."""
        objectness, deltas = [], []
        for feature in features:
            hidden = self.conv(feature).relu_()
            logits = self.objectness(hidden)
            n, a, h, w = logits.shape
            objectness.append(logits.permute(0, 2, 3, 1).reshape(n, -1))
            box = self.box_deltas(hidden).view(n, a, 4, h, w)
            deltas.append(box.permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(objectness, dim=1), torch.cat(deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposes boxes per image from the FPN levels and, in training, computes
    ``loss_objectness`` and ``loss_rpn_box_reg``."""

    def __init__(
        self,
        *,
        in_channels: int,
        anchor_sizes: Sequence[int],
        aspect_ratios: Sequence[float],
        pre_nms_top_n_train: int,
        pre_nms_top_n_test: int,
        post_nms_top_n_train: int,
        post_nms_top_n_test: int,
        nms_thresh: float,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        min_size: float,
        objectness_loss: str = "bce",
        box_loss: BoxLoss = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
    ) -> None:
        super().__init__()
        if objectness_loss not in ("bce", "focal"):
            raise ValueError(f"unknown objectness loss {objectness_loss!r}")
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios)
        # With the focal loss, start from a low objectness prior (RetinaNet's p = 0.01) so the
        # many easy negatives do not dominate the first iterations.
        prior_bias = -4.59511985013459 if objectness_loss == "focal" else 0.0
        self.head = RPNHead(
            in_channels=in_channels,
            num_anchors=self.anchor_generator.num_anchors_per_location,
            objectness_bias_init=prior_bias,
        )
        self.box_coder = BoxCoder(box_weights, bbox_xform_clip)
        self.matcher = ProposalMatcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.objectness_loss = objectness_loss
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self,
        features: list[Tensor],
        batch_size: Sequence[int],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Proposals, dict[str, Tensor]]:
        objectness, deltas = self.head(features)
        # Proposal selection, decoding and losses in float32, also under mixed precision.
        objectness, deltas = objectness.float(), deltas.float()
        feature_sizes = [f.shape[-2:] for f in features]
        anchors = self.anchor_generator(batch_size, feature_sizes)
        level_counts = [
            int(h * w) * self.anchor_generator.num_anchors_per_location for h, w in feature_sizes
        ]
        proposals = self._select_proposals(
            objectness.detach(), deltas.detach(), anchors, level_counts, image_sizes
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses = self._losses(objectness, deltas, anchors, targets)
        return proposals, losses

    def _select_proposals(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        level_counts: list[int],
        image_sizes: list[tuple[int, int]],
    ) -> Proposals:
        """The ``post_nms_top_n`` best proposals per image after NMS, as a fixed-size padded
        batch: no size here depends on the data, so the host never waits for the device."""
        mode = "train" if self.training else "test"
        pre_nms_top_n = self.pre_nms_top_n[mode]
        num_images = objectness.shape[0]
        # Top-k per level first, then decode only the kept anchors (torchvision decodes all).
        top_idx, top_levels = [], []
        offset = 0
        for level, count in enumerate(level_counts):
            k = min(pre_nms_top_n, count)
            _, idx = objectness[:, offset : offset + count].topk(k, dim=1)
            top_idx.append(idx + offset)
            top_levels.append(torch.full((k,), level, dtype=torch.int64, device=idx.device))
            offset += count
        idx = torch.cat(top_idx, dim=1)  # [N, K]
        levels = torch.cat(top_levels)
        rows = torch.arange(num_images, device=idx.device)[:, None]
        scores = torch.sigmoid(objectness[rows, idx])
        boxes = self.box_coder.decode(deltas[rows, idx].reshape(-1, 4), anchors[idx.reshape(-1)])
        boxes = boxes.view(num_images, -1, 4)
        boxes = torch.stack(
            [clip_boxes_to_image(b, size) for b, size in zip(boxes, image_sizes, strict=True)]
        )
        candidate = nonsmall_box_mask(boxes.reshape(-1, 4), self.min_size).view_as(scores) & (
            scores >= self.score_thresh
        )
        # NMS per image and level; the filtered-out boxes are padding (class -1).
        classes = torch.where(candidate, levels[None, :], -1)
        keep = nms_keep_per_image(boxes, scores, self.nms_thresh, classes)
        order, valid = top_kept(scores, keep, self.post_nms_top_n[mode])
        return Proposals(boxes.gather(1, order[..., None].expand(-1, -1, 4)), valid)

    def _losses(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        # Fixed sizes throughout: the sampler gives [N, S] anchor indices with masks.
        matches = torch.stack([self.matcher(t["boxes"], anchors) for t in targets])  # [N, A]
        # 1: object, 0: background, -1: ignored (between the IoU thresholds).
        labels = (matches >= 0).to(torch.int64).masked_fill(matches == -2, -1)
        index, positive, valid = self.sampler(labels)  # [N, S]
        matched_boxes = []
        for target, image_matches, image_index in zip(targets, matches, index, strict=True):
            gt_boxes = target["boxes"]
            if gt_boxes.shape[0] == 0:  # nothing positive: any finite target does
                matched_boxes.append(anchors[image_index].to(deltas.dtype))
            else:
                matched_boxes.append(gt_boxes[image_matches[image_index].clamp(min=0)])
        sampled_anchors = anchors[index.reshape(-1)]
        box_targets = self.box_coder.encode(torch.cat(matched_boxes), sampled_anchors)
        box_targets = torch.where(positive.reshape(-1, 1), box_targets, 0.0)
        sampled_deltas = deltas.gather(1, index[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        sampled_deltas = torch.where(positive.reshape(-1, 1), sampled_deltas, box_targets)
        num_sampled = valid.sum().clamp(min=1)  # a device tensor: no host read
        box_loss = (
            box_regression_loss(sampled_deltas, box_targets, self.box_loss, self.smooth_l1_beta)
            / num_sampled
        )
        sampled_logits = objectness.gather(1, index)
        sampled_labels = positive.to(sampled_logits.dtype)
        if self.objectness_loss == "focal":
            # Normalised by the positives of the whole global batch (averaged over ranks), so
            # the gradient does not depend on how the batch is split across processes.
            num_pos = average_across_ranks(positive.sum().to(sampled_logits.dtype))
            objectness_loss = sigmoid_focal_loss(
                torch.where(valid, sampled_logits, PADDING_LOGIT),
                sampled_labels,
                self.focal_alpha,
                self.focal_gamma,
                "sum",
            ) / num_pos.clamp(min=1.0)
        else:
            bce = F.binary_cross_entropy_with_logits(
                sampled_logits, sampled_labels, reduction="none"
            )
            objectness_loss = masked_mean(bce, valid)
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
