"""PNG pictures of validation images: the ground truth on the left, the predictions (masks,
boxes, class names and scores) on the right, both in original image coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .inference import Picture

# Distinct colours, one per class (cycled).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)  # fmt: skip
MASK_ALPHA = 0.45
TITLE_HEIGHT = 14
GAP = 4
MIN_DISPLAY = 320


def _colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def display_scale(height: int, width: int) -> int:
    """Integer enlargement that brings small images to about MIN_DISPLAY px, so that the
    captions stay readable (nearest neighbour: the pixels stay the evaluated ones)."""
    return max(1, MIN_DISPLAY // max(height, width))


def _panel(image: np.ndarray, masks, boxes, colours, captions, title: str) -> Image.Image:
    """One annotated panel: masks blended in, boxes outlined, captions over the boxes."""
    canvas = image.astype(np.float32)
    for mask, colour in zip(masks, colours, strict=True):
        if mask is not None:
            canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * np.array(colour)
    height, width = image.shape[:2]
    k = display_scale(height, width)
    shown = Image.fromarray(canvas.round().astype(np.uint8)).resize(
        (width * k, height * k), Image.Resampling.NEAREST
    )
    panel = Image.new("RGB", (width * k, height * k + TITLE_HEIGHT), (255, 255, 255))
    panel.paste(shown, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(panel)
    draw.text((2, 1), title, fill=(0, 0, 0))
    for box, colour, caption in zip(boxes, colours, captions, strict=True):
        x1, y1, x2, y2 = (v * k for v in box)
        top, bottom = y1 + TITLE_HEIGHT, y2 + TITLE_HEIGHT
        draw.rectangle((x1, top, max(x1, x2 - 1), max(top, bottom - 1)), outline=colour, width=2)
        label = draw.textbbox((x1 + 2, top + 2), caption)
        draw.rectangle((label[0] - 1, label[1] - 1, label[2] + 1, label[3] + 1), fill=colour)
        draw.text((x1 + 2, top + 2), caption, fill=(0, 0, 0))
    return panel


def draw_picture(
    picture: Picture, gt: dict, class_names: list[str], contiguous_of: dict[int, int]
) -> Image.Image:
    """Ground truth (from the COCO dict ``gt``) beside the picture's predictions.
    ``class_names`` by contiguous index; ``contiguous_of`` maps COCO category ids to it."""
    image = picture.image.permute(1, 2, 0).numpy()
    annotations = [a for a in gt["annotations"] if a["image_id"] == picture.image_id]
    gt_masks, gt_boxes, gt_colours, gt_captions = [], [], [], []
    for annotation in annotations:
        index = contiguous_of[annotation["category_id"]]
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, *image.shape[:2]))
        gt_masks.append(mask_utils.decode(segmentation).astype(bool))
        x, y, w, h = annotation["bbox"]
        gt_boxes.append((x, y, x + w, y + h))
        gt_colours.append(_colour(index))
        crowd = " (crowd)" if annotation.get("iscrowd") else ""
        gt_captions.append(class_names[index] + crowd)
    labels = [int(label) for label in picture.labels]
    predicted = _panel(
        image,
        [m.numpy() for m in picture.masks] if picture.masks is not None else [None] * len(labels),
        [tuple(box) for box in picture.boxes.tolist()],
        [_colour(label) for label in labels],
        [
            f"{class_names[label]} {score:.2f}"
            for label, score in zip(labels, picture.scores.tolist(), strict=True)
        ],
        f"predictions ({len(labels)})",
    )
    truth = _panel(
        image, gt_masks, gt_boxes, gt_colours, gt_captions, f"ground truth ({len(annotations)})"
    )
    both = Image.new("RGB", (truth.width + GAP + predicted.width, truth.height), (255, 255, 255))
    both.paste(truth, (0, 0))
    both.paste(predicted, (truth.width + GAP, 0))
    return both


def save_pictures(
    pictures: list[Picture],
    out_dir: str | Path,
    *,
    gt: dict,
    class_names: list[str],
    contiguous_of: dict[int, int],
) -> list[Path]:
    """One PNG per picture, ``out_dir/image_<id>.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for picture in pictures:
        path = out_dir / f"image_{picture.image_id:08d}.png"
        draw_picture(picture, gt, class_names, contiguous_of).save(path)
        paths.append(path)
    return paths
