"""Decoding a shard sample and turning it into the model's (image, target) pair.

Resize rule. torchvision's GeneralizedRCNNTransform computes
``scale = min(min_size / min(h, w), max_size / max(h, w))`` and interpolates with
``scale_factor=scale, recompute_scale_factor=True``, which FLOORS ``h * scale``. Flooring is
not idempotent: an image resized once and handed to the model is resized again to a
different size in about 4% of (h, w, min, max) combinations (e.g. 180x161 at 800/1333 ->
894x799 -> 895x800). We use the same scale but ROUND the size and interpolate to that size
explicitly: then the short side is exactly min_size (or the long side exactly max_size), the
model's own resize computes a scale of exactly 1.0 and leaves the size unchanged.
Masks are resized with nearest neighbour, boxes by the per-axis size ratios (as torchvision).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size for the shortest-edge rule bounded by max_size (see module docstring)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return round(height * scale), round(width * scale)


def decode_image(data: bytes, extension: str) -> torch.Tensor:
    """uint8 RGB [3, H, W]; libjpeg-turbo through torchvision for JPEG and PNG, else PIL."""
    if extension in ("jpg", "jpeg", "png"):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        decode = decode_jpeg if extension != "png" else decode_png
        return decode(encoded, mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_masks(rles: list[dict], height: int, width: int) -> torch.Tensor:
    """uint8 [N, H, W] from compressed RLEs, decoded by pycocotools straight from the
    counts strings (no polygon rasterisation, no per-pixel Python). pycocotools writes
    column-major masks; the result is a zero-copy (non-contiguous) view of them."""
    if not rles:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    decoded = mask_utils.decode(rles)  # [H, W, N] in Fortran order = C-order [N, W, H]
    return torch.from_numpy(decoded.T).transpose(1, 2)


def split_sample(sample: dict) -> tuple[bytes, str, dict]:
    """(image bytes, extension, record) of a WebDataset sample; KeyError names the key."""
    if "json" not in sample:
        raise KeyError(f"sample {sample.get('__key__')} has no .json")
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension], extension, json.loads(sample["json"])
    raise KeyError(f"sample {sample.get('__key__')} has no image")


def training_annotations(record: dict, coco_to_contiguous: dict[int, int]):
    """Boxes (xyxy, clipped to the image), labels and RLEs of the non-crowd annotations
    with a positive area box; crowd ones stay in the shard but are no training target."""
    height, width = record["height"], record["width"]
    boxes, labels, rles = [], [], []
    for annotation in record["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        x, y, w, h = annotation["bbox"]
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:  # degenerate boxes break the box regression targets
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(coco_to_contiguous[annotation["category_id"]])
        rles.append(annotation["segmentation"])
    boxes_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return boxes_tensor, torch.tensor(labels, dtype=torch.int64), rles


def make_example(
    sample: dict,
    *,
    coco_to_contiguous: dict[int, int],
    min_size: int,
    max_size: int,
    flip: bool,
) -> tuple[torch.Tensor, dict]:
    """Decode a shard sample, optionally flip it horizontally, resize it; return
    (uint8 image, target)."""
    data, extension, record = split_sample(sample)
    height, width = record["height"], record["width"]
    image = decode_image(data, extension)
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(
            f"sample {sample.get('__key__')}: image is {tuple(image.shape[-2:])}, "
            f"record says {(height, width)}"
        )
    boxes, labels, rles = training_annotations(record, coco_to_contiguous)
    masks = decode_masks(rles, height, width)
    return flip_and_resize(
        image, boxes, labels, masks, record["image_id"], min_size=min_size, max_size=max_size,
        flip=flip, mask_extents=rle_extents(rles),
    )  # fmt: skip


def nearest_indices(size: int, new_size: int) -> torch.Tensor:
    """Source index of each output index, as torch's ``mode="nearest"`` computes it."""
    scale = torch.tensor(size / new_size, dtype=torch.float32)
    return (torch.arange(new_size, dtype=torch.float32) * scale).long().clamp_(max=size - 1)


def resize_masks_nearest(
    masks: torch.Tensor,
    new_height: int,
    new_width: int,
    flip: bool = False,
    extents: list[tuple[int, int, int, int]] | None = None,
) -> torch.Tensor:
    """Nearest-neighbour resize of uint8 masks [N, H, W] (after a horizontal flip if
    ``flip``), equal to F.interpolate's, but computed only over each mask's bounding
    rectangle: objects cover a small part of the image. ``extents`` are those rectangles
    as inclusive (x0, y0, x1, y1) of the unflipped masks, x1 < x0 for an empty mask; without
    them they are measured on the masks."""
    count, height, width = masks.shape
    out = torch.zeros((count, new_height, new_width), dtype=torch.uint8)
    if count == 0:
        return out
    if extents is None:
        extents = mask_extents(masks)
    rows, cols = nearest_indices(height, new_height), nearest_indices(width, new_width)
    for i, (x0, y0, x1, y1) in enumerate(extents):
        if x1 < x0 or y1 < y0:
            continue
        if flip:
            x0, x1 = width - 1 - x1, width - 1 - x0
        # Output rows/cols whose source lies inside the rectangle (indices are sorted).
        r0, r1 = int(torch.searchsorted(rows, y0)), int(torch.searchsorted(rows, y1, right=True))
        c0, c1 = int(torch.searchsorted(cols, x0)), int(torch.searchsorted(cols, x1, right=True))
        source_cols = cols[c0:c1] if not flip else (width - 1) - cols[c0:c1]
        mask = masks[i]
        if mask.stride(0) == 1:  # column-major, as pycocotools decodes: gather columns first
            picked = mask.t().index_select(0, source_cols).index_select(1, rows[r0:r1]).t()
        else:
            picked = mask.index_select(0, rows[r0:r1]).index_select(1, source_cols)
        out[i, r0:r1, c0:c1] = picked
    return out


def mask_extents(masks: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Inclusive (x0, y0, x1, y1) of each mask's pixels; (0, 0, -1, -1) when empty."""
    extents = []
    for row_hit, col_hit in zip(masks.amax(dim=2), masks.amax(dim=1), strict=True):
        ys, xs = torch.nonzero(row_hit), torch.nonzero(col_hit)
        if len(ys) == 0:
            extents.append((0, 0, -1, -1))
        else:
            extents.append((int(xs[0, 0]), int(ys[0, 0]), int(xs[-1, 0]), int(ys[-1, 0])))
    return extents


def rle_extents(rles: list[dict]) -> list[tuple[int, int, int, int]]:
    """Mask extents straight from the RLEs (pycocotools toBbox), without decoding."""
    if not rles:
        return []
    return [
        (int(x), int(y), int(x + w) - 1, int(y + h) - 1) for x, y, w, h in mask_utils.toBbox(rles)
    ]


def flip_and_resize(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    image_id: int,
    *,
    min_size: int,
    max_size: int,
    flip: bool,
    mask_extents: list[tuple[int, int, int, int]] | None = None,
) -> tuple[torch.Tensor, dict]:
    """The geometric transforms on a decoded uint8 image [3, H, W], xyxy boxes and uint8
    masks [N, H, W]; returns the resized uint8 image (``pack_batch`` or ``to_float`` make
    it float 0-1) and the target dict."""
    height, width = image.shape[-2:]
    if flip:  # on the small uint8 source, before resizing: cheaper (masks: in the resize)
        image = image.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    new_height, new_width = resized_size(height, width, min_size, max_size)
    # Bilinear on uint8: torch's vectorised path, ~4x faster than on float; the values
    # differ from resizing a float image by the uint8 rounding (at most 1/255).
    image = F.interpolate(
        image[None], size=(new_height, new_width), mode="bilinear", align_corners=False
    )[0]
    masks = resize_masks_nearest(masks, new_height, new_width, flip=flip, extents=mask_extents)
    ratios = torch.tensor(
        [new_width / width, new_height / height, new_width / width, new_height / height],
        dtype=torch.float32,
    )
    target = {
        "boxes": boxes * ratios,
        "labels": labels,
        "masks": masks,
        "image_id": image_id,
        "orig_size": (int(height), int(width)),
    }
    return image, target


def to_float(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 images to float32 in 0-1."""
    return [image.float().mul_(1.0 / 255.0) for image in images]


def shared_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory when made in a DataLoader worker: the batch is
    written there once instead of being copied again when it is sent."""
    buffer = torch.empty(numel, dtype=dtype)
    return buffer.share_memory_() if get_worker_info() is not None else buffer


def pack_batch(examples: list[tuple[torch.Tensor, dict]]) -> dict:
    """A batch as three tensors (float images and boxes, uint8 masks, labels) plus shapes;
    the uint8 images become float 0-1 here, in the worker.

    Every tensor a DataLoader worker returns crosses to the main process as its own shared
    memory segment, and each costs a file-descriptor hand-over through a socket; with an
    image, boxes, labels and masks per example, that hand-over took as much time as the
    decoding. Packed, a batch costs three."""
    images = [image for image, _ in examples]
    targets = [target for _, target in examples]
    floats = shared_buffer(
        sum(image.numel() for image in images) + sum(t["boxes"].numel() for t in targets),
        torch.float32,
    )
    offset = 0
    for image in images:
        view = floats[offset : offset + image.numel()]
        torch.mul(image.reshape(-1), 1.0 / 255.0, out=view)
        offset += image.numel()
    torch.cat([t["boxes"].reshape(-1) for t in targets], out=floats[offset:])
    mask_parts = [t["masks"].reshape(-1) for t in targets]
    masks = shared_buffer(sum(part.numel() for part in mask_parts), torch.uint8)
    torch.cat(mask_parts, out=masks)
    return {
        "floats": floats,
        "masks": masks,
        "labels": torch.cat([t["labels"] for t in targets]),
        "image_shapes": [tuple(image.shape) for image in images],
        "mask_shapes": [tuple(t["masks"].shape) for t in targets],
        "meta": [(t["image_id"], t["orig_size"]) for t in targets],
    }


def split_views(buffer: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    pieces = torch.split(buffer, [math.prod(shape) for shape in shapes])
    return [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]


def unpack_batch(packed: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """(images, targets) from ``pack_batch``'s output, as views of its buffers (no copy)."""
    counts = [shape[0] for shape in packed["mask_shapes"]]
    float_shapes = packed["image_shapes"] + [(n, 4) for n in counts]
    views = split_views(packed["floats"], float_shapes)
    images, boxes = views[: len(counts)], views[len(counts) :]
    masks = split_views(packed["masks"], packed["mask_shapes"])
    labels = torch.split(packed["labels"], counts)
    targets = [
        {"boxes": b, "labels": lab, "masks": m, "image_id": image_id, "orig_size": orig_size}
        for b, lab, m, (image_id, orig_size) in zip(
            boxes, labels, masks, packed["meta"], strict=True
        )
    ]
    return images, targets


def collate(examples: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    """(images list, targets list): torchvision's calling convention."""
    return [image for image, _ in examples], [target for _, target in examples]
