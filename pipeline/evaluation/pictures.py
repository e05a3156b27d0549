"""PNG pictures of validation images: the ground truth on the left, the predictions (masks,
boxes, class names and scores) on the right, both in original image coordinates; and
:func:`draw_detections`, one image's detections drawn at its own size (``launch/predict.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
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


def blend_masks(image: np.ndarray, masks, colours) -> np.ndarray:
    """``image`` (uint8 [H, W, 3]) with each bool mask [H, W] blended in its colour. Each mask
    is blended inside its own bounding window only: a photo's full-size masks would otherwise
    cost a pass over every pixel each."""
    out = image.copy()
    for mask, colour in zip(masks, colours, strict=True):
        if mask is None:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        region, inside = out[window], mask[window]  # region is a view: writes go to out
        blended = (1 - MASK_ALPHA) * region[inside] + MASK_ALPHA * np.array(colour)
        region[inside] = blended.round().astype(np.uint8)
    return out


def draw_boxes(
    draw: ImageDraw.ImageDraw,
    boxes: Sequence[Sequence[float]],
    colours: Sequence[tuple[int, int, int]],
    captions: Sequence[str],
    *,
    scale: int = 1,
    top: int = 0,
    width: int = 2,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None,
) -> None:
    """Outline each box (xyxy, image pixels; drawn ``scale`` times larger, ``top`` pixels
    lower) and write its caption on a patch of its colour in its top-left corner."""
    for box, colour, caption in zip(boxes, colours, captions, strict=True):
        x1, y1, x2, y2 = (v * scale for v in box)
        y1, y2 = y1 + top, y2 + top
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        label = draw.textbbox((x1 + width, y1 + width), caption, font=font)
        draw.rectangle((label[0] - 1, label[1] - 1, label[2] + 1, label[3] + 1), fill=colour)
        draw.text((x1 + width, y1 + width), caption, fill=(0, 0, 0), font=font)


def _panel(image: np.ndarray, masks, boxes, colours, captions, title: str) -> Image.Image:
    """One annotated panel: masks blended in, boxes outlined, captions over the boxes."""
    height, width = image.shape[:2]
    k = display_scale(height, width)
    shown = Image.fromarray(blend_masks(image, masks, colours)).resize(
        (width * k, height * k), Image.Resampling.NEAREST
    )
    panel = Image.new("RGB", (width * k, height * k + TITLE_HEIGHT), (255, 255, 255))
    panel.paste(shown, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(panel)
    draw.text((2, 1), title, fill=(0, 0, 0))
    draw_boxes(draw, boxes, colours, captions, scale=k, top=TITLE_HEIGHT)
    return panel


def draw_detections(
    image: np.ndarray,
    *,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    masks: np.ndarray | None,
    class_names: Sequence[str],
) -> Image.Image:
    """One image (uint8 [H, W, 3]) at its own size with its detections: masks (bool
    [N, H, W]) blended in, boxes (xyxy) outlined and captioned ``name score``, a colour per
    output index. Lines and captions grow with the image, so that they stay readable on a
    12-megapixel photo shown scaled down."""
    longer = max(image.shape[:2])
    font = ImageFont.load_default(size=max(11, longer // 60)) if longer > 640 else None
    colours = [_colour(int(label)) for label in labels]
    masks_or_none = list(masks) if masks is not None else [None] * len(colours)
    picture = Image.fromarray(blend_masks(image, masks_or_none, colours))
    pairs = zip(labels, scores, strict=True)
    captions = [f"{class_names[int(label)]} {score:.2f}" for label, score in pairs]
    draw_boxes(
        ImageDraw.Draw(picture), boxes, colours, captions, width=max(2, longer // 400), font=font
    )
    return picture


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
