"""FPN level assignment for the multilevel pooler, as torchvision's ``MultiScaleRoIAlign`` does it.

A RoI of size ``sqrt(area)`` goes to level ``floor(canonical_level + log2(sqrt(area) /
canonical_size) + 1e-6)``, clamped to the levels present: a 224x224 box to P4, each halving of the
size one level down. A box whose size is not a number (a NaN coordinate, or x2 < x1 xor y2 < y1,
which makes the area negative) goes to the first level, where torchvision's mapping is undefined;
the pooler gives it zeros anyway. Levels are numbered by stride exponent (P2 has stride 4 = 2**2,
spatial scale 1/4), so the pyramid's first and last spatial scales give the clamp range.
"""

import math

import torch

__all__ = ["default_spatial_scales", "level_range", "map_rois_to_levels"]

LEVEL_EPS = 1e-6  # torchvision's LevelMapper eps: keeps exact powers of two on the upper level


def default_spatial_scales(num_levels: int, first_level: int = 2) -> list[float]:
    """Scales of ``num_levels`` consecutive pyramid levels from P``first_level``: 1/4, 1/8, ..."""
    return [2.0 ** -(first_level + i) for i in range(num_levels)]


def level_range(spatial_scales: list[float]) -> tuple[int, int]:
    """(k_min, k_max): the pyramid levels of the first and last scale (P2..P5 -> (2, 5)).

    The scales must be consecutive powers of two (each level half the previous one's size), the
    layout the level mapping assumes.
    """
    levels = [round(-math.log2(scale)) for scale in spatial_scales]
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(
            "spatial_scales must be consecutive powers of two (1/4, 1/8, ...), "
            f"got {spatial_scales}"
        )
    return levels[0], levels[-1]


def map_rois_to_levels(
    rois: torch.Tensor,
    k_min: int,
    k_max: int,
    canonical_size: int = 224,
    canonical_level: int = 4,
) -> torch.Tensor:
    """Level index (0 = k_min) of each RoI of ``rois`` [K, 5], as int64 [K].

    Operation for operation torchvision's LevelMapper (``box_area``, ``sqrt``, ``log2``, the eps
    tensor in the boxes' dtype), so both assign every RoI to the same level; NaN sizes, which it
    leaves undefined, go to level 0.
    """
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    size = torch.sqrt(area)
    eps = torch.tensor(LEVEL_EPS, dtype=size.dtype)
    levels = torch.floor(canonical_level + torch.log2(size / canonical_size) + eps)
    levels = torch.clamp(levels, min=k_min, max=k_max).nan_to_num(nan=k_min)
    return levels.to(torch.int64) - k_min
