"""Pure-PyTorch reference implementations of the ops, differentiable through autograd.

They are the oracle of the tests and the fallback when the compiled kernels are missing. Written
for clarity and exactness, not speed: RoIAlign gathers every tap of every sample at once (memory
grows with RoIs x samples x channels), and NMS walks the boxes in Python, 64 at a time. The
formulas mirror ``ops/csrc/ops_math.h`` (and torchvision's kernels) operation for operation.
"""

import torch
from torch import Tensor

from .fpn_levels import default_spatial_scales, level_range, map_rois_to_levels

__all__ = ["batched_nms", "multilevel_roi_align", "nms", "roi_align"]

_NMS_BLOCK = 64
_MAX_ADAPTIVE_GRID = 1 << 14  # ops_math.h's kMaxAdaptiveGrid


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _cubic_near(t: Tensor) -> Tensor:  # Keys kernel, a = -0.5, |t| <= 1
    return ((-0.5 + 2) * t - (-0.5 + 3)) * t * t + 1


def _cubic_far(t: Tensor) -> Tensor:  # 1 < |t| < 2
    return ((-0.5 * t - 5 * -0.5) * t + 8 * -0.5) * t - 4 * -0.5


def _axis_taps(coord: Tensor, size: int, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Taps of sample coordinates along one axis: (index [..., T], weight [..., T], valid [...])."""
    valid = (coord >= -1.0) & (coord <= size)
    safe = torch.where(valid, coord, torch.zeros_like(coord))
    if mode == "bilinear":
        safe = safe.clamp(min=0)
        low = safe.to(torch.int64)  # truncation, as the kernels' (int) cast
        at_edge = low >= size - 1
        low = torch.where(at_edge, torch.full_like(low, size - 1), low)
        high = torch.where(at_edge, low, low + 1)
        safe = torch.where(at_edge, low.to(coord.dtype), safe)
        frac = safe - low
        index = torch.stack([low, high], dim=-1)
        weight = torch.stack([1.0 - frac, frac], dim=-1)
    elif mode == "bicubic":
        floor = torch.floor(safe)
        t = safe - floor
        offsets = torch.arange(-1, 3, device=coord.device)
        index = (floor.to(torch.int64).unsqueeze(-1) + offsets).clamp(0, size - 1)
        weight = torch.stack(
            [_cubic_far(t + 1.0), _cubic_near(t), _cubic_near(1.0 - t), _cubic_far(2.0 - t)], dim=-1
        )
    else:
        raise ValueError(f'mode must be "bilinear" or "bicubic", got {mode!r}')
    return index, weight, valid


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    mode: str = "bilinear",
) -> Tensor:
    """Reference of :func:`ops.roi_align`."""
    pooled_h, pooled_w = _pair(output_size)
    _, channels, height, width = input.shape
    num_rois = rois.shape[0]
    dtype, device = input.dtype, input.device
    if num_rois == 0:
        return input.new_zeros((0, channels, pooled_h, pooled_w))
    if dtype not in (torch.float32, torch.float64):
        # float16/bfloat16 features: computed in float32 and rounded once, as the kernels do.
        pooled = roi_align(
            input.float(), rois, output_size, spatial_scale, sampling_ratio, aligned, mode
        )
        return pooled.to(dtype)
    rois = rois.to(dtype)

    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h
    # NaN/infinite or inverted RoIs get no samples: zeros, no gradient.
    valid_roi = (roi_w >= 0) & (roi_h >= 0) & torch.isfinite(roi_w) & torch.isfinite(roi_h)
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
    else:
        grid_h = torch.ceil(roi_h / pooled_h).clamp(max=_MAX_ADAPTIVE_GRID)
        grid_w = torch.ceil(roi_w / pooled_w).clamp(max=_MAX_ADAPTIVE_GRID)
        grid_h = torch.where(valid_roi, grid_h, 0).to(torch.int64)
        grid_w = torch.where(valid_roi, grid_w, 0).to(torch.int64)
    grid_h = torch.where(valid_roi, grid_h, 0)
    grid_w = torch.where(valid_roi, grid_w, 0)
    count = (grid_h * grid_w).clamp(min=1).to(dtype)

    def sample_taps(start, bin_size, grid, pooled, size):
        # Coordinates [K, pooled, max_grid]; samples beyond a RoI's own grid are masked out.
        max_grid = max(int(grid.max()), 1)
        sample = torch.arange(max_grid, device=device)
        bins = torch.arange(pooled, device=device).to(dtype)
        coord = (
            start[:, None, None]
            + bins[None, :, None] * bin_size[:, None, None]
            + (sample.to(dtype)[None, None, :] + 0.5)
            * bin_size[:, None, None]
            / grid.clamp(min=1).to(dtype)[:, None, None]
        )
        index, weight, valid = _axis_taps(coord, size, mode)
        valid = valid & (sample[None, None, :] < grid[:, None, None])
        return index, weight, valid

    y_index, y_weight, y_valid = sample_taps(start_h, bin_h, grid_h, pooled_h, height)
    x_index, x_weight, x_valid = sample_taps(start_w, bin_w, grid_w, pooled_w, width)
    # Dimensions below: K, ph, iy, ty (y taps), pw, ix, tx (x taps).
    flat_index = (
        y_index[:, :, :, :, None, None, None] * width + x_index[:, None, None, None, :, :, :]
    )
    weight = y_weight[:, :, :, :, None, None, None] * x_weight[:, None, None, None, :, :, :]
    valid = y_valid[:, :, :, None, None, None, None] & x_valid[:, None, None, None, :, :, None]
    batch = rois[:, 0].to(torch.int64)
    planes = input.reshape(input.shape[0], channels, height * width)
    # values[k, c, ...] = planes[batch[k], c, flat_index[k, ...]]
    values = planes[
        batch[:, None, None],
        torch.arange(channels, device=device)[None, :, None],
        flat_index.reshape(num_rois, 1, -1),
    ]
    values = values.reshape(num_rois, channels, *flat_index.shape[1:])
    contrib = torch.where(valid[:, None], weight[:, None] * values, torch.zeros((), dtype=dtype))
    pooled = contrib.sum(dim=(3, 4, 6, 7))  # -> [K, C, ph, pw]
    return pooled / count[:, None, None, None]


def multilevel_roi_align(
    features: list[Tensor],
    rois: Tensor,
    output_size: int | tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = True,
    canonical_size: int = 224,
    canonical_level: int = 4,
    mode: str = "bilinear",
    *,
    spatial_scales: list[float] | None = None,
) -> Tensor:
    """Reference of :func:`ops.multilevel_roi_align`: one roi_align per level, then merged."""
    pooled_h, pooled_w = _pair(output_size)
    scales = spatial_scales if spatial_scales is not None else default_spatial_scales(len(features))
    k_min, k_max = level_range(scales)
    levels = map_rois_to_levels(rois, k_min, k_max, canonical_size, canonical_level)
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], pooled_h, pooled_w))
    for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
        index = torch.nonzero(levels == level).flatten()
        pooled = roi_align(
            feature, rois[index], (pooled_h, pooled_w), scale, sampling_ratio, aligned, mode
        )
        result = result.index_put((index,), pooled)
    return result


def _iou_matrix(rows: Tensor, cols: Tensor) -> Tensor:
    """IoU of every row box with every column box, in the kernels' order of operations."""
    area_r = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
    area_c = (cols[:, 2] - cols[:, 0]) * (cols[:, 3] - cols[:, 1])
    w = (
        torch.minimum(rows[:, None, 2], cols[None, :, 2])
        - torch.maximum(rows[:, None, 0], cols[None, :, 0])
    ).clamp(min=0)
    h = (
        torch.minimum(rows[:, None, 3], cols[None, :, 3])
        - torch.maximum(rows[:, None, 1], cols[None, :, 1])
    ).clamp(min=0)
    inter = w * h
    return inter / (area_r[:, None] + area_c[None, :] - inter)


def _threshold_as(threshold: float, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` value not above ``threshold``: ``iou > it`` in ``dtype`` then decides
    exactly as ``iou > threshold`` in double (torchvision's comparison)."""
    t = torch.tensor(threshold, dtype=dtype)
    if float(t) > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t


def _greedy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, classes: Tensor | None):
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order].detach()
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()  # float16/bfloat16 boxes are compared in float32, as the kernels do
    classes = classes[order] if classes is not None else None
    threshold = _threshold_as(iou_threshold, boxes.dtype).to(boxes.device)
    n = boxes.shape[0]
    removed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept: list[int] = []
    for start in range(0, n, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, n)
        suppress = _iou_matrix(boxes[start:stop], boxes[start:]) > threshold
        if classes is not None:
            suppress &= classes[start:stop, None] == classes[None, start:]
        # Settle the block's own boxes in order, then let its survivors suppress the rest.
        block_suppress = suppress[:, : stop - start].tolist()
        block_removed = removed[start:stop].tolist()
        survivors = []
        for r in range(stop - start):
            if block_removed[r]:
                continue
            survivors.append(r)
            for c in range(r + 1, stop - start):
                block_removed[c] |= block_suppress[r][c]
        kept.extend(start + r for r in survivors)
        if survivors:
            removed[stop:] |= suppress[survivors, stop - start :].any(dim=0)
    return order[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Reference of :func:`ops.nms`: greedy NMS in decreasing score order (stable on ties)."""
    return _greedy_nms(boxes, scores, iou_threshold, None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Reference of :func:`ops.batched_nms`: boxes of different ``idxs`` never interact."""
    return _greedy_nms(boxes, scores, iou_threshold, idxs)
