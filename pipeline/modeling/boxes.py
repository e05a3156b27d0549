"""Box arithmetic shared by the RPN and the RoI heads: IoU, the box coder, the chunked
proposal matcher (the balanced sampler is in :mod:`.sampling`).

Boxes follow the convention stated in :mod:`pipeline.modeling` (xyxy, absolute pixels, no +1).
The arithmetic mirrors torchvision's operation by operation, so that a model converted from
torchvision decodes bit-identical boxes from identical network outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Clamp on the predicted log-scale of a box so exp() cannot overflow: torchvision's and
# detectron2's value.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Matcher results for candidates that are not matched to a ground-truth box.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU matrix [N, M] of two sets of boxes (same operations as torchvision's box_iou)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    height, width = int(image_size[0]), int(image_size[1])
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def nonsmall_box_mask(boxes: Tensor, min_size: float) -> Tensor:
    """True for boxes whose width and height are both at least ``min_size``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths >= min_size) & (heights >= min_size)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and back.

    ``weights`` scale the deltas (RPN: (1, 1, 1, 1), box head: (10, 10, 5, 5));
    ``bbox_xform_clip`` bounds dw and dh before the exponential.
    """

    def __init__(
        self,
        weights: Sequence[float],
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """Deltas [N, 4] that turn ``references`` [N, 4] into ``targets`` [N, 4]."""
        wx, wy, ww, wh = self.weights
        ref_widths = references[:, 2] - references[:, 0]
        ref_heights = references[:, 3] - references[:, 1]
        ref_ctr_x = references[:, 0] + 0.5 * ref_widths
        ref_ctr_y = references[:, 1] + 0.5 * ref_heights
        gt_widths = targets[:, 2] - targets[:, 0]
        gt_heights = targets[:, 3] - targets[:, 1]
        gt_ctr_x = targets[:, 0] + 0.5 * gt_widths
        gt_ctr_y = targets[:, 1] + 0.5 * gt_heights
        dx = wx * (gt_ctr_x - ref_ctr_x) / ref_widths
        dy = wy * (gt_ctr_y - ref_ctr_y) / ref_heights
        dw = ww * torch.log(gt_widths / ref_widths)
        dh = wh * torch.log(gt_heights / ref_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Boxes [N, C, 4] from deltas [N, 4 * C] applied to ``references`` [N, 4]."""
        references = references.to(deltas.dtype)
        widths = references[:, 2] - references[:, 0]
        heights = references[:, 3] - references[:, 1]
        ctr_x = references[:, 0] + 0.5 * widths
        ctr_y = references[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        # Division (not multiplication by the reciprocal) keeps torchvision's rounding.
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
            dim=2,
        )


class ProposalMatcher:
    """Assigns each candidate box (anchor or proposal) to its best ground-truth box.

    Returns, per candidate, the index of the matched ground-truth box, ``BELOW_LOW_THRESHOLD``
    (-1, background) or ``BETWEEN_THRESHOLDS`` (-2, ignored). With ``allow_low_quality_matches``
    each ground-truth box also keeps the candidates it overlaps most (torchvision's Matcher).

    The IoU matrix is computed in chunks of candidates of at most ``max_chunk_elements``
    entries, so an image with hundreds of objects against ~10^5 anchors does not materialise a
    multi-gigabyte matrix (maskrcnn-benchmark#18); the result equals the unchunked one.
    """

    def __init__(
        self,
        high_threshold: float,
        low_threshold: float,
        allow_low_quality_matches: bool,
        max_chunk_elements: int = 1 << 21,
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.max_chunk_elements = max_chunk_elements

    def __call__(self, gt_boxes: Tensor, candidates: Tensor) -> Tensor:
        # Without a host-device synchronisation: no nonzero, no boolean indexing, no reads.
        num_candidates = candidates.shape[0]
        if gt_boxes.numel() == 0:
            return torch.full(
                (num_candidates,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=candidates.device
            )
        chunk = max(1, self.max_chunk_elements // gt_boxes.shape[0])
        starts = range(0, num_candidates, chunk)
        matched_vals, matches, ious = [], [], []
        best_iou_per_gt = None
        for start in starts:
            iou = box_iou(gt_boxes, candidates[start : start + chunk])  # [G, c]
            vals, idxs = iou.max(dim=0)
            matched_vals.append(vals)
            matches.append(idxs)
            if self.allow_low_quality_matches:
                chunk_best = iou.max(dim=1).values
                best_iou_per_gt = (
                    chunk_best
                    if best_iou_per_gt is None
                    else torch.max(best_iou_per_gt, chunk_best)
                )
                if len(starts) == 1:
                    ious.append(iou)
        matched_vals_t = torch.cat(matched_vals)
        all_matches = torch.cat(matches)
        result = all_matches.masked_fill(matched_vals_t < self.low_threshold, BELOW_LOW_THRESHOLD)
        between = (matched_vals_t >= self.low_threshold) & (matched_vals_t < self.high_threshold)
        result = result.masked_fill(between, BETWEEN_THRESHOLDS)
        if self.allow_low_quality_matches:
            # Candidates that are some ground-truth box's best match keep their (argmax) match,
            # even below the thresholds, as torchvision does (IoU-0 ties included: a ground-truth
            # box overlapping no candidate keeps every candidate). Several chunks: a second pass
            # recomputes their IoUs, against the global best.
            best = best_iou_per_gt[:, None]
            low_quality = torch.cat(
                [
                    (
                        (ious[0] if ious else box_iou(gt_boxes, candidates[s : s + chunk])) == best
                    ).any(dim=0)
                    for s in starts
                ]
            )
            result = torch.where(low_quality, all_matches, result)
        return result
