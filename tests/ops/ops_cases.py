"""Input generators for the ops tests (boxes, RoIs, pyramids)."""

import torch


def random_boxes(
    n: int,
    height: float,
    width: float,
    min_size: float = 1.0,
    max_size: float = 64.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[n, 4] xyxy boxes with log-uniform sizes in [min_size, max_size], centres in the image.

    Boxes near the border stick out of the image, which the kernels must handle.
    """
    log_size = torch.empty(n, dtype=torch.float64).uniform_(
        torch.tensor(min_size).log().item(), torch.tensor(max_size).log().item()
    )
    aspect = torch.empty(n, dtype=torch.float64).uniform_(-0.7, 0.7).exp().sqrt()
    w, h = log_size.exp() * aspect, log_size.exp() / aspect
    cx, cy = torch.rand(n, dtype=torch.float64) * width, torch.rand(n, dtype=torch.float64) * height
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1).to(dtype)


def to_rois(boxes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[K, 5] RoIs from [K, 4] boxes, spread over the batch at random."""
    batch = torch.randint(0, batch_size, (boxes.shape[0], 1)).to(boxes.dtype)
    return torch.cat([batch, boxes], dim=1)


def per_image_boxes(rois: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """torchvision's list-of-boxes form of [K, 5] RoIs whose batch indices are sorted."""
    return [rois[rois[:, 0] == b, 1:] for b in range(batch_size)]
