"""A synthetic COCO instance-segmentation dataset: coloured circles, squares and triangles
that overlap and occlude one another on a noisy, textured background.

Every shape is a convex polygon (a circle is a 48-gon). Shapes are painted in order, so a
later shape hides the earlier ones; the annotation of a shape is its VISIBLE part, computed
exactly with convex polygon clipping: convex A minus convex B is the disjoint union, over
B's edges e_i, of A clipped to the outside of e_i and the inside of e_1..e_{i-1}. The
result is a list of convex pieces (holes included, which a single COCO polygon cannot
express), written as a multi-polygon segmentation. Shapes hidden entirely are dropped.

Output for a seed is byte-identical on every run: each image has its own generator seeded
by (seed, split, index), JPEGs use a fixed quality and the JSON has no timestamps.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
JPEG_QUALITY = 90
CIRCLE_SIDES = 48
EMPTY_IMAGE_PROBABILITY = 0.08
MAX_SHAPES = 6
# Pieces thinner than this (in px²) are numerical slivers of the clipping, not real regions.
MIN_PIECE_AREA = 0.5
SPLIT_CODES = {"train": 0, "val": 1}


def polygon_area(points: np.ndarray) -> float:
    """Signed area (shoelace); positive for counter-clockwise in x-right/y-up terms."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def clip_to_halfplane(points: np.ndarray, a: np.ndarray, b: np.ndarray, keep_left: bool):
    """Sutherland-Hodgman: the part of a convex polygon on one side of the line a->b."""
    if len(points) == 0:
        return points
    edge = b - a
    side = edge[0] * (points[:, 1] - a[1]) - edge[1] * (points[:, 0] - a[0])
    if not keep_left:
        side = -side
    out = []
    count = len(points)
    for i in range(count):
        j = (i + 1) % count
        p, q, sp, sq = points[i], points[j], side[i], side[j]
        if sp >= 0:
            out.append(p)
        if (sp >= 0) != (sq >= 0):
            t = sp / (sp - sq)
            out.append(p + t * (q - p))
    return np.array(out) if len(out) >= 3 else np.zeros((0, 2))


def subtract_convex(piece: np.ndarray, occluder: np.ndarray) -> list[np.ndarray]:
    """``piece`` minus ``occluder`` (both convex, counter-clockwise) as disjoint convex pieces."""
    pieces = []
    remainder = piece
    count = len(occluder)
    for i in range(count):
        a, b = occluder[i], occluder[(i + 1) % count]
        outside = clip_to_halfplane(remainder, a, b, keep_left=False)
        if len(outside) and abs(polygon_area(outside)) >= MIN_PIECE_AREA:
            pieces.append(outside)
        remainder = clip_to_halfplane(remainder, a, b, keep_left=True)
        if len(remainder) == 0:
            break
    return pieces


def counter_clockwise(points: np.ndarray) -> np.ndarray:
    return points if polygon_area(points) > 0 else points[::-1].copy()


def random_shape(rng: np.random.Generator, width: int, height: int) -> tuple[int, np.ndarray]:
    """A category id and its convex outline (float vertices, counter-clockwise)."""
    category = int(rng.integers(1, 4))
    short = min(width, height)
    radius = rng.uniform(0.08, 0.28) * short
    cx = rng.uniform(0.05 * width, 0.95 * width)
    cy = rng.uniform(0.05 * height, 0.95 * height)
    rotation = rng.uniform(0, 2 * math.pi)
    sides = {1: CIRCLE_SIDES, 2: 4, 3: 3}[category]
    angles = rotation + np.arange(sides) * (2 * math.pi / sides)
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return category, counter_clockwise(points)


def textured_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-frequency colour blotches plus per-pixel noise, uint8 [H, W, 3]."""
    coarse = rng.integers(40, 216, size=(6, 6, 3), dtype=np.uint8)
    blotches = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR),
        dtype=np.int16,
    )
    noise = rng.integers(-25, 26, size=(height, width, 3), dtype=np.int16)
    return np.clip(blotches + noise, 0, 255).astype(np.uint8)


def visible_parts(outlines: list[np.ndarray]) -> list[list[np.ndarray]]:
    """For each outline (in painting order), the convex pieces left visible by later ones."""
    visible = []
    for index, outline in enumerate(outlines):
        pieces = [outline]
        for occluder in outlines[index + 1 :]:
            pieces = [part for piece in pieces for part in subtract_convex(piece, occluder)]
            if not pieces:
                break
        visible.append(pieces)
    return visible


def render_image(rng: np.random.Generator, size: int):
    """One image: the JPEG bytes, its (height, width) and its visible shapes as
    (category id, list of flat polygons)."""
    width = int(rng.integers(round(0.75 * size), size + 1))
    height = int(rng.integers(round(0.75 * size), size + 1))
    canvas = Image.fromarray(textured_background(rng, width, height))
    draw = ImageDraw.Draw(canvas)
    count = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else int(rng.integers(1, MAX_SHAPES + 1))
    shapes = [random_shape(rng, width, height) for _ in range(count)]
    for _, outline in shapes:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon([(float(x), float(y)) for x, y in outline], fill=colour)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    instances = []
    for (category, _), pieces in zip(shapes, visible_parts([o for _, o in shapes]), strict=True):
        polygons = [[round(float(v), 2) for v in piece.reshape(-1)] for piece in pieces]
        if polygons:
            instances.append((category, polygons))
    return buffer.getvalue(), (height, width), instances


def annotation_for(polygons: list[list[float]], height: int, width: int):
    """COCO bbox (xywh) and area of the rasterised polygons, or None if nothing is left."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    area = int(mask_utils.area(rle))
    if area == 0:
        return None
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return bbox, area


def write_split(out_dir: Path, split: str, count: int, size: int, seed: int) -> dict:
    """Write ``count`` images of one split and return its COCO dictionary."""
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        jpeg, (height, width), instances = render_image(rng, size)
        file_name = f"{split}_{index:06d}.jpg"
        (image_dir / file_name).write_bytes(jpeg)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category, polygons in instances:
            box_and_area = annotation_for(polygons, height, width)
            if box_and_area is None:  # hidden except for sub-pixel slivers
                continue
            bbox, area = box_and_area
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": polygons,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"synthetic shapes, seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def make_shapes_dataset(out_dir: str | Path, train: int, val: int, size: int, seed: int) -> dict:
    """Write ``out_dir/images/{train,val}/*.jpg`` and
    ``out_dir/annotations/instances_{train,val}.json``; return {split: annotation path}."""
    if size < 32:
        raise ValueError(f"image size {size} is too small (at least 32)")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", train), ("val", val)):
        coco = write_split(out_dir, split, count, size, seed)
        path = out_dir / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco, separators=(",", ":")))
        written[split] = path
    return written
