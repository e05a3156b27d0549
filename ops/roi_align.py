"""RoIAlign over one feature map, and the fused multi-level (FPN) pooler.

See the package docstring (``ops``) for the box convention.

dtypes: features float32, float64, float16 or bfloat16 (the last two computed in float32, rounded
once per output, their gradients accumulated in float32 and rounded once); RoIs of any floating
dtype, read in the compute type. Under autocast (CPU or CUDA) the ops run in float32 and return the
features' dtype. Features may have any strides: channels-last ones are read in place (the layout a
channels_last model produces), others as NCHW; the output is contiguous NCHW either way, and the
input gradients have the features' layout.

A RoI with a NaN or infinite coordinate, or with x2 < x1 or y2 < y1, pools to zeros and gets no
gradient (torchvision's output for such boxes is an artefact of its arithmetic).
"""

import torch
from torch import Tensor

from . import reference
from ._extension import use_reference
from .fpn_levels import default_spatial_scales, level_range, map_rois_to_levels

__all__ = ["multilevel_roi_align", "roi_align"]

_MODES = ("bilinear", "bicubic")


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f'mode must be "bilinear" or "bicubic", got {mode!r}')


def _as_rois(rois: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """[K, 5] RoIs, also from torchvision's other form: one [L_i, 4] box tensor per image."""
    if isinstance(rois, Tensor):
        return rois
    boxes = list(rois)
    if not boxes:
        raise ValueError("rois must be a [K, 5] tensor or a non-empty list of [L, 4] tensors")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"rois as a list holds [L, 4] boxes, got {tuple(b.shape)} at {i}")
    indices = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(indices), torch.cat(boxes)], dim=1)


def roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    mode: str = "bilinear",
) -> Tensor:
    """Average of interpolated samples over each bin of each RoI (Mask R-CNN's RoIAlign).

    Args:
        input: features [N, C, H, W] (any strides; float32/float64/float16/bfloat16).
        rois: [K, 5] rows of (batch_index, x1, y1, x2, y2) in image pixels, any floating dtype;
            or, as torchvision also takes them, a list of per-image [L_i, 4] boxes.
        output_size: bins per RoI, ``int`` or ``(height, width)``.
        spatial_scale: feature-map size / image size, e.g. 1/4 for a stride-4 map.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive,
            ``ceil(roi_size / output_size)`` per RoI (torchvision's rule).
        aligned: shift boxes by half a pixel (True, default) or torchvision's legacy False.
        mode: "bilinear" (equal to ``torchvision.ops.roi_align``) or "bicubic" (16 taps, Keys
            kernel a = -0.5, neighbour indices clamped to the border).

    Returns:
        [K, C, output_size[0], output_size[1]], differentiable w.r.t. ``input``.
    """
    _check_mode(mode)
    pooled_h, pooled_w = _pair(output_size)
    rois = _as_rois(rois)
    if use_reference(input):
        return reference.roi_align(
            input, rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned, mode
        )
    return torch.ops.maskrcnn_ops.roi_align(
        input,
        rois,
        float(spatial_scale),
        pooled_h,
        pooled_w,
        int(sampling_ratio),
        bool(aligned),
        mode,
    )


def multilevel_roi_align(
    features: list[Tensor],
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = True,
    canonical_size: int = 224,
    canonical_level: int = 4,
    mode: str = "bilinear",
    *,
    spatial_scales: list[float] | None = None,
) -> Tensor:
    """The FPN pooler: each RoI is pooled from the level its size selects, all in one kernel.

    RoI k goes to level ``floor(canonical_level + log2(sqrt(area_k) / canonical_size) + 1e-6)``,
    clamped to the levels given (torchvision's LevelMapper, see ``ops.fpn_levels``), then is
    pooled as :func:`roi_align` would on that level.

    Args:
        features: the pyramid levels [N, C, H_l, W_l], finest first (P2, P3, ...), one dtype and
            device, same N and C.
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in image pixels, or per-image [L_i, 4] boxes.
        spatial_scales: per-level scales; they must be consecutive powers of two. Default
            ``[1/4, 1/8, ...]`` for ``len(features)`` levels starting at P2 (stride 4). The scales
            are not inferred from the feature shapes, which are rounded by the backbone.
        Other arguments as in :func:`roi_align`.

    With ``aligned=False`` this equals ``torchvision.ops.MultiScaleRoIAlign(names, output_size,
    sampling_ratio)`` on P2-P5 features given the same boxes (as per-image lists there).
    """
    _check_mode(mode)
    pooled_h, pooled_w = _pair(output_size)
    rois = _as_rois(rois)
    features = list(features)
    if spatial_scales is None:
        spatial_scales = default_spatial_scales(len(features))
    spatial_scales = [float(scale) for scale in spatial_scales]
    if len(spatial_scales) != len(features):
        raise ValueError(f"{len(features)} feature levels but {len(spatial_scales)} spatial_scales")
    if use_reference(rois):
        return reference.multilevel_roi_align(
            features,
            rois,
            (pooled_h, pooled_w),
            sampling_ratio,
            aligned,
            canonical_size,
            canonical_level,
            mode,
            spatial_scales=spatial_scales,
        )
    k_min, k_max = level_range(spatial_scales)
    levels = map_rois_to_levels(rois, k_min, k_max, canonical_size, canonical_level)
    return torch.ops.maskrcnn_ops.multilevel_roi_align(
        features,
        rois,
        levels,
        spatial_scales,
        pooled_h,
        pooled_w,
        int(sampling_ratio),
        bool(aligned),
        mode,
    )
