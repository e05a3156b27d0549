"""Reading a COCO instance annotation file for sharding: validation with one-line errors,
the category table, and the conversion of every segmentation form to compressed RLE."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "segmentation")


class CocoFormatError(ValueError):
    """The annotation file is not valid COCO; the message is one line naming file and key."""


@dataclass
class CocoSource:
    """A validated annotation file: images sorted by id, each with its annotations."""

    path: Path
    sha256: str
    images: list[dict]
    annotations_by_image: dict[int, list[dict]]
    categories: list[dict]
    """[{"id": coco id, "name": ..., "index": contiguous 1..K in COCO-id order}]"""
    problems: list[dict] = field(default_factory=list)
    """Annotations that were dropped, each {"annotation_id", "image_id", "reason"}."""


def category_table(categories: list[dict]) -> list[dict]:
    """COCO id, name and contiguous index 1..K (0 is the background) in COCO-id order."""
    ordered = sorted(categories, key=lambda c: c["id"])
    return [{"id": c["id"], "name": c["name"], "index": i + 1} for i, c in enumerate(ordered)]


def _require_list(coco: dict, key: str, path: Path) -> list:
    if key not in coco:
        raise CocoFormatError(f"{path}: missing top-level key '{key}'")
    if not isinstance(coco[key], list):
        raise CocoFormatError(f"{path}: '{key}' must be a list, got {type(coco[key]).__name__}")
    return coco[key]


def _check_image(record, position: int, path: Path) -> None:
    if not isinstance(record, dict):
        raise CocoFormatError(f"{path}: images[{position}] is not an object")
    for key in IMAGE_FIELDS:
        if key not in record:
            raise CocoFormatError(f"{path}: images[{position}] lacks '{key}'")
    for key in ("height", "width"):
        if not isinstance(record[key], int) or record[key] <= 0:
            raise CocoFormatError(f"{path}: images[{position}] has a bad '{key}': {record[key]!r}")


def load_coco(path: str | Path) -> CocoSource:
    """Parse and validate; structural errors raise CocoFormatError, annotations that point
    at an unknown image or category are dropped and listed in ``problems``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CocoFormatError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        coco = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{path}: the top level must be an object")
    image_records = _require_list(coco, "images", path)
    annotation_records = _require_list(coco, "annotations", path)
    category_records = _require_list(coco, "categories", path)

    images = {}
    for position, record in enumerate(image_records):
        _check_image(record, position, path)
        if record["id"] in images:
            raise CocoFormatError(f"{path}: images[{position}] repeats image id {record['id']}")
        images[record["id"]] = record
    category_ids = set()
    for position, record in enumerate(category_records):
        if not isinstance(record, dict) or "id" not in record or "name" not in record:
            raise CocoFormatError(f"{path}: categories[{position}] needs 'id' and 'name'")
        if record["id"] in category_ids:
            raise CocoFormatError(f"{path}: categories[{position}] repeats id {record['id']}")
        category_ids.add(record["id"])

    by_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    problems = []
    for position, record in enumerate(annotation_records):
        reason = annotation_problem(record, images, category_ids)
        if reason is not None:
            record = record if isinstance(record, dict) else {}
            problems.append(
                {
                    "annotation_id": record.get("id", f"annotations[{position}]"),
                    "image_id": record.get("image_id"),
                    "reason": reason,
                }
            )
            continue
        by_image[record["image_id"]].append(record)
    return CocoSource(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        images=sorted(images.values(), key=lambda r: r["id"]),
        annotations_by_image=by_image,
        categories=category_table(category_records),
        problems=problems,
    )


def annotation_problem(record, images: dict, category_ids: set) -> str | None:
    if not isinstance(record, dict):
        return "not an object"
    missing = [key for key in ANNOTATION_FIELDS if key not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    if record["image_id"] not in images:
        return f"unknown image id {record['image_id']}"
    if record["category_id"] not in category_ids:
        return f"unknown category id {record['category_id']}"
    bbox = record["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4):
        return f"bbox must be [x, y, w, h], got {bbox!r}"
    # The segmentation itself is converted (and checked) by the shard workers, in parallel.
    return None


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE
    ``{"size": [h, w], "counts": str}``."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) > 0]
        if not polygons:
            rle = mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        else:
            for polygon in polygons:
                if len(polygon) < 6 or len(polygon) % 2:
                    raise ValueError(
                        f"a polygon needs an even number >= 6 of coordinates, got {len(polygon)}"
                    )
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        size = list(segmentation["size"])
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if sum(counts) != height * width:
                raise ValueError(f"RLE counts sum to {sum(counts)}, not {height * width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts}
            mask_utils.area(rle)  # parses the counts; raises on garbage
        else:
            raise TypeError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    else:
        raise TypeError(f"segmentation must be a list or a dict, got {type(segmentation).__name__}")
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }
