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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
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
    counts strings (no polygon rasterisation, no per-pixel Python)."""
    if not rles:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    decoded = mask_utils.decode(rles)  # [H, W, N], Fortran order
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))


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
    """Decode, optionally flip horizontally, resize; return (float image 0-1, target)."""
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
    if flip:  # on the small uint8 source, before resizing: cheaper
        image = image.flip(-1)
        masks = masks.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    new_height, new_width = resized_size(height, width, min_size, max_size)
    image = F.interpolate(
        image[None].float(), size=(new_height, new_width), mode="bilinear", align_corners=False
    )[0].mul_(1.0 / 255.0)
    if len(masks):
        masks = F.interpolate(masks[None], size=(new_height, new_width), mode="nearest")[0]
    else:
        masks = torch.zeros((0, new_height, new_width), dtype=torch.uint8)
    ratios = torch.tensor(
        [new_width / width, new_height / height, new_width / width, new_height / height],
        dtype=torch.float32,
    )
    target = {
        "boxes": boxes * ratios,
        "labels": labels,
        "masks": masks,
        "image_id": record["image_id"],
        "orig_size": (height, width),
    }
    return image, target


def collate(examples: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    """(images list, targets list): torchvision's calling convention."""
    return [image for image, _ in examples], [target for _, target in examples]
