"""A synthetic COCO instance-segmentation dataset: coloured circles, squares and triangles
that overlap and occlude one another on a background of random colour.

Each image is ``size`` x ``size`` (128 by default) with 1 to 4 shapes of random kind, colour,
rotation and radius (10 to 28 px at 128 px, scaled with ``size``), placed independently, so
they overlap. Shapes are painted in order into a label map, so a later shape hides the earlier
ones; the image takes its colours from that map, and the annotation of a shape is its VISIBLE
mask (the pixels of the label map that still show it), stored as compressed RLE with the bbox
and area of that mask. Visible masks of one image are therefore disjoint, and a shape whose
visible part is ``MIN_VISIBLE_AREA`` px or less is drawn but not annotated. Mild per-pixel
noise and JPEG compression keep the colours from being exactly flat.

Output for a seed is byte-identical on every run: each image has its own generator seeded
by (seed, split, index), so the train and val splits (and other seeds) are independent draws;
JPEGs use a fixed quality and the JSON has no timestamps.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
SIDES = {1: 48, 2: 4, 3: 3}  # a circle is a 48-gon
DEFAULT_SIZE = 128
# 1000 training images: 550 steps of 8 images (the reference schedule) are ~4.4 epochs.
DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES = 1000, 200
MIN_SHAPES, MAX_SHAPES = 1, 4
# Circumradius range in px at DEFAULT_SIZE; other sizes scale it.
RADIUS_RANGE = (10.0, 28.0)
# A shape showing this many pixels or fewer after occlusion is not annotated.
MIN_VISIBLE_AREA = 20
NOISE = 8  # per-pixel noise amplitude (uniform in [-NOISE, NOISE] per channel)
JPEG_QUALITY = 90
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass
class DrawnShape:
    """One painted shape: its category, geometry and the pixels it still shows."""

    category: int
    radius: float
    outline: np.ndarray  # [sides, 2] float (x, y) vertices
    visible: np.ndarray  # [H, W] bool


def polygon_area(points: np.ndarray) -> float:
    """Unsigned area of a simple polygon (shoelace)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def radius_range(size: int) -> tuple[float, float]:
    scale = size / DEFAULT_SIZE
    return RADIUS_RANGE[0] * scale, RADIUS_RANGE[1] * scale


def random_outline(rng: np.random.Generator, size: int) -> tuple[int, float, np.ndarray]:
    """A category id, radius and outline. The centre lies at least half a radius inside the
    image, so a shape may be cut by the border but is mostly visible if nothing covers it."""
    category = int(rng.integers(1, len(CATEGORIES) + 1))
    radius = float(rng.uniform(*radius_range(size)))
    cx, cy = rng.uniform(radius / 2, size - radius / 2, size=2)
    rotation = rng.uniform(0, 2 * math.pi)
    angles = rotation + np.arange(SIDES[category]) * (2 * math.pi / SIDES[category])
    outline = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return category, radius, outline


def render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[DrawnShape]]:
    """One image (uint8 [size, size, 3]) and every shape painted on it, in painting order,
    including those that end up (nearly) hidden."""
    count = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    shapes = [random_outline(rng, size) for _ in range(count)]
    labels = Image.new("L", (size, size), 0)  # 0 = background, k = k-th shape
    draw = ImageDraw.Draw(labels)
    for index, (_, _, outline) in enumerate(shapes, start=1):
        draw.polygon([(float(x), float(y)) for x, y in outline], fill=index)
    label_map = np.asarray(labels)
    # Row 0 is the background colour, row k the colour of the k-th shape.
    palette = rng.integers(0, 256, size=(count + 1, 3)).astype(np.int16)
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3), dtype=np.int16)
    pixels = np.clip(palette[label_map] + noise, 0, 255).astype(np.uint8)
    drawn = [
        DrawnShape(category, radius, outline, label_map == index)
        for index, (category, radius, outline) in enumerate(shapes, start=1)
    ]
    return pixels, drawn


def annotation_fields(visible: np.ndarray) -> dict:
    """COCO segmentation (compressed RLE), bbox (xywh) and area of a visible mask."""
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    return {
        "segmentation": {"size": list(visible.shape), "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
    }


def write_split(out_dir: Path, split: str, count: int, size: int, seed: int) -> dict:
    """Write ``count`` images of one split and return its COCO dictionary."""
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        pixels, shapes = render_image(rng, size)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        file_name = f"{split}_{index:06d}.jpg"
        (image_dir / file_name).write_bytes(buffer.getvalue())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for shape in shapes:
            if int(shape.visible.sum()) <= MIN_VISIBLE_AREA:  # hidden, or too little left
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": shape.category,
                    **annotation_fields(shape.visible),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"synthetic shapes, seed {seed}", "version": "2"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def make_shapes_dataset(
    out_dir: str | Path,
    train: int = DEFAULT_TRAIN_IMAGES,
    val: int = DEFAULT_VAL_IMAGES,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
) -> dict:
    """Write ``out_dir/images/{train,val}/*.jpg`` and
    ``out_dir/annotations/instances_{train,val}.json``; return {split: annotation path}."""
    if size < 32:
        raise ValueError(f"image size {size} is too small (at least 32)")
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train}, val={val}")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", train), ("val", val)):
        coco = write_split(out_dir, split, count, size, seed)
        path = out_dir / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco, separators=(",", ":")))
        written[split] = path
    return written
