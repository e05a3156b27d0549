"""The plain way to read a COCO dataset and score a torchvision-style detector on it, shared
by the benchmarks that compare against a reference: images and annotations straight from the
COCO json and image files (no shards), and pycocotools COCOeval for bbox and segm AP.

Self-contained on purpose (it does not use pipeline.evaluation): a reference must not share
code with what it is the reference for.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image


def quiet_coco(annotation_file: str | Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


class CocoInstances(Dataset):
    """(image float [3, H, W] in [0, 1], target) pairs of one COCO split in torchvision's
    format: boxes xyxy float, labels = COCO category ids, masks uint8 [N, H, W], image_id.
    Crowd annotations are left out. ``flip`` mirrors half of the samples horizontally."""

    def __init__(self, coco: COCO, image_dir: str | Path, flip: bool = False):
        self.coco = coco
        self.image_dir = Path(image_dir)
        self.image_ids = sorted(coco.imgs)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255
        height, width = image.shape[-2:]
        annotations = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        if annotations:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in annotations]))
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        if self.flip and torch.rand(()) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1
            )
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}
        return image, target


def collate(batch):
    return tuple(zip(*batch, strict=True))


def coco_results(outputs: list[dict], image_ids: list[int]) -> list[dict]:
    """torchvision's postprocessed outputs (boxes xyxy in original pixels, mask probabilities
    [N, 1, H, W]) as COCO result records carrying both a bbox and a segmentation."""
    results = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].tolist()
        scores = output["scores"].tolist()
        labels = output["labels"].tolist()
        masks = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        for (x1, y1, x2, y2), score, label, rle in zip(boxes, scores, labels, rles, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    return results


def coco_ap(coco: COCO, results: list[dict]) -> dict[str, float]:
    """bbox and segm AP (IoU .50:.95) and AP50 of ``results`` against ``coco``; zeros when
    there are no detections at all (COCO.loadRes refuses an empty list)."""
    figures = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            figures[f"{iou_type}_ap"] = figures[f"{iou_type}_ap50"] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco.loadRes([dict(r) for r in results])  # loadRes edits the records
            evaluator = COCOeval(coco, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        figures[f"{iou_type}_ap"] = float(evaluator.stats[0])
        figures[f"{iou_type}_ap50"] = float(evaluator.stats[1])
    return figures


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, coco: COCO) -> dict[str, float]:
    """Run ``model`` in eval mode over ``loader`` and score it with COCOeval."""
    model.eval()
    results = []
    for images, targets in loader:
        outputs = model(list(images))
        results += coco_results(outputs, [t["image_id"] for t in targets])
    return coco_ap(coco, results)
