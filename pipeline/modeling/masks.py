"""Pasting of the per-detection mask probabilities into the full image, vectorised.

The geometry is torchvision's ``paste_masks_in_image`` (masks padded by one zero pixel, boxes
expanded to match and truncated to integers, bilinear resize to the box size with
``align_corners=False``), but instead of a Python loop resizing one mask at a time, all masks of
a chunk are resized at once with two batched matrix products (bilinear interpolation is
separable: ``crop = Wy @ mask @ Wx^T``) into crops of the largest box size of the chunk, which
are then scattered into their boxes of the zero-filled output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the temporaries (crops and their scatter indices) of one chunk of masks.
DEFAULT_CHUNK_BYTES = 256 << 20


def _interpolation_matrix(offsets: Tensor, lengths: Tensor, in_size: int, out_size: int) -> Tensor:
    """[N, out_size, in_size] bilinear (align_corners=False) weights resizing a signal of
    ``in_size`` samples to ``lengths[n]`` samples, for output samples ``offsets[n] + i``,
    i < out_size; samples outside [0, lengths[n]) get zero weights."""
    device = lengths.device
    lengths_f = lengths.to(torch.float32)[:, None]
    scale = in_size / lengths_f  # torch's area_pixel_compute_scale for a given output size
    dst = (offsets[:, None] + torch.arange(out_size, device=device)[None, :]).to(torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    lo = src.floor().clamp(max=in_size - 1)
    frac = src - lo
    lo_idx = lo.to(torch.int64)
    hi_idx = (lo_idx + 1).clamp(max=in_size - 1)
    weights = torch.zeros(lengths.shape[0], out_size, in_size, device=device)
    weights.scatter_add_(2, lo_idx[..., None], (1 - frac)[..., None])
    weights.scatter_add_(2, hi_idx[..., None], frac[..., None])
    inside = (dst >= 0) & (dst < lengths_f)
    return weights * inside[..., None]


def paste_sizes(masks: Tensor, boxes: Tensor, image_size: Sequence[int], padding: int = 1):
    """What :func:`paste_masks_in_image` computes on the device before it reads anything:
    (geometry tensors, ``sizes`` [N, 3] int64: each detection's size class and crop height and
    width). The host needs ``sizes``: a caller pasting several images reads them all at once
    (one synchronisation for the batch) and passes each image's rows as ``sizes``."""
    height, width = int(image_size[0]), int(image_size[1])
    m = masks.shape[-1]
    scale = float(m + 2 * padding) / m
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    ctr_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    ctr_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    int_boxes = torch.stack(
        (ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=1
    ).to(torch.int64)
    x0, y0 = int_boxes[:, 0], int_boxes[:, 1]
    box_w = (int_boxes[:, 2] - x0 + 1).clamp(min=1)
    box_h = (int_boxes[:, 3] - y0 + 1).clamp(min=1)
    # Each crop covers the part of its box inside the image; a chunk's crops share the largest
    # such size. Detections are grouped by the power of two of their longer crop side first, so
    # one big box does not make every small mask of its chunk pay for a full-image crop.
    crop_x0, crop_y0 = x0.clamp(0, width), y0.clamp(0, height)
    crop_w = ((x0 + box_w).clamp(max=width) - crop_x0).clamp(min=0)
    crop_h = ((y0 + box_h).clamp(max=height) - crop_y0).clamp(min=0)
    size_class = torch.maximum(crop_h, crop_w).clamp(min=1).to(torch.float32).log2().ceil()
    geometry = (x0, y0, box_w, box_h, crop_x0, crop_y0, crop_w, crop_h, size_class)
    return geometry, torch.stack((size_class.to(torch.int64), crop_h, crop_w), dim=1)


def paste_masks_in_image(
    masks: Tensor,
    boxes: Tensor,
    image_size: Sequence[int],
    padding: int = 1,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sizes: list[list[int]] | None = None,
) -> Tensor:
    """Paste ``masks`` [N, 1, M, M] (probabilities inside ``boxes`` [N, 4], xyxy in the target
    image) into [N, 1, H, W] images of ``image_size`` (H, W). ``sizes``: the host's copy of
    :func:`paste_sizes`'s rows for these detections (read here when None: one host read)."""
    height, width = int(image_size[0]), int(image_size[1])
    num = masks.shape[0]
    # One spare element past the output: the cells outside a crop are written there, instead of
    # being dropped by boolean indexing (whose size is the data's: a host read on a GPU).
    storage = masks.new_zeros(num * height * width + 1)
    out = storage[:-1].view(num, 1, height, width)
    if num == 0:
        return out
    padded = F.pad(masks[:, 0], (padding,) * 4)  # [N, M+2p, M+2p]
    geometry, size_rows = paste_sizes(masks, boxes, image_size, padding)
    x0, y0, box_w, box_h, crop_x0, crop_y0, crop_w, crop_h, size_class = geometry
    if sizes is None:
        sizes = size_rows.tolist()
    # The groups in increasing size class, each in increasing detection order: on the host from
    # ``sizes``, on the device as the same stable sort.
    host_order = sorted(range(num), key=lambda i: sizes[i][0])
    by_class = size_class.argsort(stable=True)
    start = 0
    while start < num:
        group = sizes[host_order[start]][0]
        end = start
        while end < num and sizes[host_order[end]][0] == group:
            end += 1
        rows = [sizes[i] for i in host_order[start:end]]
        max_h = max(1, max(r[1] for r in rows))
        max_w = max(1, max(r[2] for r in rows))
        # Temporaries per element: the crop (float32) and its scatter index (int64).
        chunk = max(1, max_chunk_bytes // (max_h * max_w * 12))
        for first in range(start, end, chunk):
            sel = by_class[first : min(first + chunk, end)]
            rows_w = _interpolation_matrix(
                crop_y0[sel] - y0[sel], box_h[sel], padded.shape[-1], max_h
            )
            cols_w = _interpolation_matrix(
                crop_x0[sel] - x0[sel], box_w[sel], padded.shape[-1], max_w
            )
            # In the masks' dtype even under autocast (bf16 would round the probabilities
            # and could not be written into the output).
            with torch.autocast(masks.device.type, enabled=False):
                crops = torch.bmm(torch.bmm(rows_w, padded[sel]), cols_w.transpose(1, 2))
            offs_y = torch.arange(max_h, device=masks.device)
            offs_x = torch.arange(max_w, device=masks.device)
            valid = (offs_y[None, :, None] < crop_h[sel, None, None]) & (
                offs_x[None, None, :] < crop_w[sel, None, None]
            )
            ys = crop_y0[sel, None] + offs_y[None, :]
            xs = crop_x0[sel, None] + offs_x[None, :]
            flat_index = (sel[:, None, None] * height + ys[:, :, None]) * width + xs[:, None, :]
            target = torch.where(valid, flat_index, storage.numel() - 1)
            storage.index_put_((target.reshape(-1),), crops.reshape(-1).to(storage.dtype))
        start = end
    return out
