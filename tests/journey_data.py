"""A small COCO-format dataset unlike the shapes, for the own-data journey test
(tests/test_own_data_journey.py): what a user brings, not what make_shapes writes.

- 5 categories with non-contiguous ids 3, 7, 11, 42, 90 (ring, plate, brick, kite, star);
- images of several sizes and aspect ratios (width x height 96x160, 160x96, 128x128,
  200x120), JPEG and PNG, some of them grayscale (mode "L" files);
- segmentations as polygons, and the rings (an ellipse with a hole) as compressed RLE;
- non-contiguous image ids, and in each split one image without any annotation.

Objects sit in distinct cells of a 2 x 2 grid, so they never overlap and each outline is
the object's visible mask. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 3, "name": "ring", "supercategory": "thing"},
    {"id": 7, "name": "plate", "supercategory": "thing"},
    {"id": 11, "name": "brick", "supercategory": "thing"},
    {"id": 42, "name": "kite", "supercategory": "thing"},
    {"id": 90, "name": "star", "supercategory": "thing"},
]
CATEGORY_IDS = [c["id"] for c in CATEGORIES]
CATEGORY_NAMES = {c["id"]: c["name"] for c in CATEGORIES}
SIZES = [(96, 160), (160, 96), (128, 128), (200, 120)]  # (width, height)
COLOURS = {3: (230, 60, 40), 7: (40, 200, 90), 11: (60, 90, 230), 42: (240, 200, 40),
           90: (200, 60, 220)}  # fmt: skip


def _outline(category: int, cx: float, cy: float, r: float, rotation: float) -> np.ndarray:
    """[N, 2] (x, y) vertices of a plate (ellipse), brick, kite or star."""
    if category == 7:  # plate: an ellipse, wider than high
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return np.stack([cx + r * np.cos(angles), cy + 0.6 * r * np.sin(angles)], axis=1)
    if category == 11:  # brick: a rectangle
        w, h = r, 0.55 * r
        return np.array([(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)])
    if category == 42:  # kite: a tall diamond
        return np.array([(cx, cy - r), (cx + 0.55 * r, cy), (cx, cy + r), (cx - 0.55 * r, cy)])
    # star: five points
    angles = rotation + np.arange(10) * (math.pi / 5)
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _ring_mask(width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A ring (ellipse with a hole) as a bool [height, width] mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    inner = 0.5 * r
    draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    return np.asarray(canvas).astype(bool)


def _annotation(category: int, width: int, height: int, cx, cy, r, rotation) -> tuple:
    """(COCO annotation fields, bool mask) of one object."""
    if category == 3:
        mask = _ring_mask(width, height, cx, cy, r)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        return {"segmentation": segmentation, "bbox": bbox, "area": int(mask.sum())}, mask
    outline = _outline(category, cx, cy, r, rotation)
    polygon = [round(float(v), 2) for v in outline.reshape(-1)]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    with warnings.catch_warnings():  # pycocotools' decode and numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle).astype(bool)
    x0, y0 = outline.min(axis=0)
    x1, y1 = outline.max(axis=0)
    bbox = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
            round(float(y1 - y0), 2)]  # fmt: skip
    return {"segmentation": [polygon], "bbox": bbox, "area": float(mask_utils.area(rle))}, mask


def _write_split(root: Path, split: str, count: int, seed: int, first_id: int) -> Path:
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    turn = 0  # round-robin categories: every split has every category
    for index in range(count):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        width, height = SIZES[index % len(SIZES)]
        gray = index % 4 == 1
        ext = "png" if index % 3 == 2 else "jpg"
        image_id = first_id + 7 * index
        name = f"{split}_{index:03d}.{ext}"
        background = rng.integers(0, 120, size=3)
        pixels = np.broadcast_to(background, (height, width, 3)).astype(np.int16)
        pixels = pixels + rng.integers(-10, 11, size=(height, width, 3))
        objects = 0 if index == count - 1 else int(rng.integers(1, 4))  # the last: none
        cells = rng.permutation(4)[:objects]
        for cell in cells:
            category = CATEGORY_IDS[turn % len(CATEGORY_IDS)]
            turn += 1
            cell_w, cell_h = width / 2, height / 2
            r = min(cell_w, cell_h) / 2 * float(rng.uniform(0.6, 0.9))
            cx = (cell % 2 + 0.5) * cell_w + float(rng.uniform(-0.1, 0.1)) * cell_w
            cy = (cell // 2 + 0.5) * cell_h + float(rng.uniform(-0.1, 0.1)) * cell_h
            fields, mask = _annotation(
                category, width, height, cx, cy, r, float(rng.uniform(0, 2 * math.pi))
            )
            pixels[mask] = np.array(COLOURS[category]) + rng.integers(-20, 21, size=3)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "iscrowd": 0, **fields,
            })  # fmt: skip
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        if gray:
            picture = picture.convert("L")
        picture.save(image_dir / name, **({"quality": 92} if ext == "jpg" else {}))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def make_journey_dataset(root: str | Path, train: int = 48, val: int = 12, seed: int = 0):
    """Write ``root/annotations/instances_{train,val}.json`` and ``root/images/{train,val}/``;
    returns {split: (annotations file, image folder)}."""
    root = Path(root)
    return {
        split: (_write_split(root, split, count, seed, first_id), root / "images" / split)
        for split, count, first_id in (("train", train, 101), ("val", val, 5001))
    }
