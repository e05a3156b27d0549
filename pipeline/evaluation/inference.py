"""Inference over one rank's share of the validation set, with the results in the
coordinates of the annotation file.

The val loader resizes every image (``input.min_size_test``), so the model works at the
resized size. :func:`detect` runs the model's stages itself to hand the post-processing the
ORIGINAL size (``target["orig_size"]``) instead of the size of the image it was given: boxes
are scaled by the per-axis ratios and the mask probabilities pasted at full resolution, as
torchvision's post-processing does for its own resize. Pasting at the resized size and then
resizing the pasted masks would blur them twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from tqdm import tqdm

from pipeline.modeling import MaskRCNN
from pipeline.modeling.transform import to_original

# (images, original sizes) -> one detection dict per image, in original coordinates; masks
# [N, 1, H, W] as probabilities, or already thresholded (bool).
Predictor = Callable[[list[Tensor], list[tuple[int, int]]], list[dict[str, Tensor]]]


@torch.inference_mode()
def detect(
    model: MaskRCNN, images: list[Tensor], original_sizes: Sequence[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """``model(images)`` (eval mode), post-processed to ``original_sizes`` instead of the
    sizes of ``images``; with ``original_sizes`` = those sizes it is ``model(images)``."""
    batch, image_sizes, _ = model.transform(images)
    features = model.backbone(batch)
    proposals, _ = model.rpn(features, batch.shape[-2:], image_sizes)
    detections, _ = model.roi_heads(features[:4], proposals, image_sizes)
    return to_original(detections, image_sizes, original_sizes)


class ModelPredictor:
    """A :data:`Predictor` running ``model`` on ``device``; results come back on the CPU,
    the masks thresholded at ``mask_threshold`` on the device: a COCO image's pasted float32
    masks are about 120 MB, their booleans a quarter of that."""

    def __init__(self, model: MaskRCNN, device: torch.device, *, mask_threshold: float):
        self.model = model.to(device).eval()
        self.device, self.mask_threshold = device, mask_threshold

    def __call__(self, images, original_sizes):
        images = [image.to(self.device, non_blocking=True) for image in images]
        detections = detect(self.model, images, original_sizes)
        for detection in detections:
            if "masks" in detection:
                detection["masks"] = detection["masks"] > self.mask_threshold
        return [{key: value.cpu() for key, value in d.items()} for d in detections]


def encode_masks(binary: Tensor) -> list[dict]:
    """COCO compressed RLEs (counts as str, JSON-ready) of uint8/bool masks [N, H, W]."""
    if binary.shape[0] == 0:
        return []
    # [N, W, H] C-order is [H, W, N] in Fortran order, which pycocotools encodes directly.
    fortran = binary.to(torch.uint8).transpose(1, 2).contiguous().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(np.asfortranarray(fortran))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_results(
    detection: dict[str, Tensor],
    image_id: int,
    *,
    contiguous_to_coco: dict[int, int],
    mask_threshold: float,
    iou_types: Sequence[str],
) -> tuple[dict[str, list[dict]], Tensor | None]:
    """COCO result entries ({iou_type: [...]}) of one image's detections, and the binary
    masks [N, H, W] (None without segm)."""
    boxes = detection["boxes"].tolist()
    scores = detection["scores"].tolist()
    categories = [contiguous_to_coco[int(label)] for label in detection["labels"]]
    results: dict[str, list[dict]] = {}
    if "bbox" in iou_types:
        results["bbox"] = [
            {"image_id": image_id, "category_id": c, "score": s,
             "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for (x1, y1, x2, y2), s, c in zip(boxes, scores, categories, strict=True)
        ]  # fmt: skip
    binary = None
    if "segm" in iou_types:
        masks = detection["masks"][:, 0]
        binary = masks if masks.dtype == torch.bool else masks > mask_threshold
        results["segm"] = [
            {"image_id": image_id, "category_id": c, "score": s, "segmentation": rle}
            for rle, s, c in zip(encode_masks(binary), scores, categories, strict=True)
        ]
    return results, binary


@dataclass
class Picture:
    """What a picture of one image needs: the image at its original size and the
    detections to draw (already filtered by score)."""

    image_id: int
    image: Tensor  # uint8 [3, H, W]
    boxes: Tensor
    labels: Tensor
    scores: Tensor
    masks: Tensor | None  # bool [N, H, W]


@dataclass
class RankOutput:
    """One rank's inference: result entries, the images it evaluated, the ones it could
    not (loader failures), a few pictures, and its inference time."""

    results: dict[str, list[dict]]
    image_ids: list[int] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)
    seconds: float = 0.0


def relabel(detection: dict[str, Tensor], labels: dict[int, int]) -> dict[str, Tensor]:
    """The detections of the outputs that ``labels`` maps, with their labels mapped (a COCO
    model's index 42 -> the dataset's 3); the others (categories the dataset lacks) dropped."""
    size = max(labels, default=0) + 1
    table = torch.zeros(size, dtype=torch.long, device=detection["labels"].device)
    for index, target in labels.items():
        table[index] = target
    found = detection["labels"]
    mapped = torch.where(found < size, table[found.clamp(max=size - 1)], 0)
    keep = mapped > 0
    return {**{key: value[keep] for key, value in detection.items()}, "labels": mapped[keep]}


def run_inference(
    predict: Predictor,
    loader,
    *,
    contiguous_to_coco: dict[int, int],
    labels: dict[int, int] | None = None,
    mask_threshold: float,
    iou_types: Sequence[str],
    num_pictures: int = 0,
    picture_score_thresh: float = 0.5,
    progress: bool = False,
) -> RankOutput:
    """Run ``predict`` over every batch of ``loader`` (this rank's share) and collect COCO
    results; the first ``num_pictures`` images are kept for drawing. ``labels`` maps the
    model's outputs to the dataset's contiguous indices (None: the same)."""
    output = RankOutput(results={iou_type: [] for iou_type in iou_types})
    start = time.perf_counter()
    bar = tqdm(total=len(loader), desc="evaluating", unit="batch", disable=not progress)
    for images, targets in loader:
        sizes = [tuple(target["orig_size"]) for target in targets]
        detections = predict(images, sizes)
        if labels is not None:
            detections = [relabel(detection, labels) for detection in detections]
        for image, target, detection in zip(images, targets, detections, strict=True):
            image_id = int(target["image_id"])
            results, binary = coco_results(
                detection, image_id, contiguous_to_coco=contiguous_to_coco,
                mask_threshold=mask_threshold, iou_types=iou_types,
            )  # fmt: skip
            for iou_type, entries in results.items():
                output.results[iou_type].extend(entries)
            output.image_ids.append(image_id)
            if len(output.pictures) < num_pictures:
                output.pictures.append(
                    make_picture(image, target["orig_size"], image_id, detection, binary,
                                 picture_score_thresh)
                )  # fmt: skip
        bar.update(1)
    bar.close()
    output.failures = list(getattr(loader, "failures", []))
    output.seconds = time.perf_counter() - start
    return output


def make_picture(
    image: Tensor,
    original_size: Sequence[int],
    image_id: int,
    detection: dict[str, Tensor],
    binary: Tensor | None,
    score_thresh: float,
) -> Picture:
    """The loader's (resized, float 0-1) image back at its original size, and the
    detections scoring at least ``score_thresh``."""
    height, width = int(original_size[0]), int(original_size[1])
    restored = F.interpolate(
        image[None].float().cpu(), size=(height, width), mode="bilinear", align_corners=False
    )[0]
    keep = detection["scores"] >= score_thresh
    return Picture(
        image_id=image_id,
        image=(restored.clamp(0, 1) * 255).round().to(torch.uint8),
        boxes=detection["boxes"][keep],
        labels=detection["labels"][keep],
        scores=detection["scores"][keep],
        masks=binary[keep] if binary is not None else None,
    )
