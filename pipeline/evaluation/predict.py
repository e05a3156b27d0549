"""A checkpoint's detections on any images (``launch/predict.py``), for whoever wants to see a
model work on their own photos.

The inputs are files, folders and glob patterns (:mod:`.image_files`), each image decoded as
it is shown, in 8-bit RGB. The model resizes it itself (its ``min_size_test`` and
``max_size_test``) and its detections come back in the image's own pixels. An image that
cannot be read (missing, not an image, truncated) is one warning and one entry under
``"failed"``; the others go on.

``OUT/predictions.json`` holds the detections scoring at least the threshold (boxes as COCO
``[x, y, w, h]``, masks as COCO RLE, the checkpoint's category ids and names) and
``OUT/pictures/<stem>.jpg`` draws them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pipeline.modeling import MaskRCNN

from .checkpoints import LoadedCheckpoint, build_eval_model, load_checkpoint
from .image_files import expand_inputs, read_ahead
from .inference import encode_masks, to_original
from .pictures import draw_detections

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5
JPEG_QUALITY = 90


class PredictError(ValueError):
    """Bad arguments (device, batch size, threshold); the message is one line."""


@dataclass
class PredictSummary:
    images: int
    detections: int
    failed: int
    seconds: float
    device: torch.device
    score_threshold: float
    json_path: Path
    pictures_dir: Path

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"predict: {self.images} images, {self.detections} detections (score >= "
            f"{self.score_threshold:g}), {self.failed} failed, {rate:.2f} images/s on "
            f"{self.device}; wrote {self.json_path} and {self.pictures_dir}/"
        )


# ---- model ----------------------------------------------------------------------------------


def resolve_device(requested: str | None) -> torch.device:
    """``requested`` (cpu, cuda, cuda:N), or cuda when available else cpu."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise PredictError(f"--device {requested}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PredictError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    elif device.type != "cpu":
        raise PredictError(f"--device {requested}: only cpu and cuda are supported")
    return device


def category_tables(loaded: LoadedCheckpoint, num_classes: int) -> tuple[dict[int, int], list]:
    """(output index -> category id, names by output index) of the checkpoint. Without a
    label map the outputs are all there is to say: ids = indices, names ``class_I``."""
    if loaded.label_map is None:
        logger.warning(
            "checkpoint %s records no label map: categories are reported as the model's output "
            "indices (ids 1..%d, names class_1...)",
            loaded.path,
            num_classes - 1,
        )
        names = ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
        return {i: i for i in range(1, num_classes)}, names
    return loaded.label_map.ids_by_index(), loaded.label_map.names_by_index()


@torch.inference_mode()
def detect_above(
    model: MaskRCNN,
    images: list[Tensor],
    *,
    score_threshold: float,
    mask_threshold: float = MASK_THRESHOLD,
) -> list[dict[str, Tensor]]:
    """``model(images)`` keeping the detections scoring at least ``score_threshold``, on the
    CPU, masks bool [N, 1, H, W]. The model's own stages, so as to drop the low scores before
    their masks are pasted: a 12-megapixel photo's 100 float masks would take 4.8 GB. The
    masks are thresholded on the device, which moves a quarter of the bytes."""
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    batch, image_sizes, _ = model.transform(images)
    features = model.backbone(batch)
    proposals, _ = model.rpn(features, batch.shape[-2:], image_sizes)
    detections, _ = model.roi_heads(features[:4], proposals, image_sizes)
    kept = [
        {key: value[d["scores"] >= score_threshold] for key, value in d.items()} for d in detections
    ]
    out = []
    for detection in to_original(kept, image_sizes, original_sizes):
        detection["masks"] = detection["masks"] > mask_threshold
        out.append({key: value.cpu() for key, value in detection.items()})
    return out


# ---- outputs ----------------------------------------------------------------------------------


def picture_names(paths: Iterable[Path]) -> dict[Path, str]:
    """A distinct ``<stem>.jpg`` per path: the stem, else the folder's name and the stem,
    else a number added (compared without case, for case-insensitive file systems)."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = path.stem
        candidates = [stem, f"{path.resolve().parent.name}_{stem}"]
        name = next((c for c in candidates if c.lower() not in taken), None)
        number = 2
        while name is None or name.lower() in taken:
            name, number = f"{stem}_{number}", number + 1
        taken.add(name.lower())
        names[path] = f"{name}.jpg"
    return names


def image_entry(
    file: str,
    size: tuple[int, int],
    detection: dict[str, Tensor],
    ids: dict[int, int],
    names: list[str],
) -> dict:
    """One image's JSON entry (COCO boxes and RLE masks, in the image's pixels)."""
    height, width = size
    rles = encode_masks(detection["masks"][:, 0])
    entries = []
    for box, label, score, rle in zip(
        detection["boxes"].tolist(), detection["labels"].tolist(),
        detection["scores"].tolist(), rles, strict=True,
    ):  # fmt: skip
        x1, y1, x2, y2 = box
        entries.append({
            "category_id": ids[label], "category_name": names[label], "score": score,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
        })  # fmt: skip
    return {"file": file, "height": height, "width": width, "detections": entries}


def _save_picture(image: Tensor, detection: dict[str, Tensor], names: list[str], path: Path):
    picture = draw_detections(
        image.permute(1, 2, 0).numpy(),
        boxes=detection["boxes"].tolist(),
        labels=detection["labels"].tolist(),
        scores=detection["scores"].tolist(),
        masks=detection["masks"][:, 0].numpy(),
        class_names=names,
    )
    picture.save(path, quality=JPEG_QUALITY)


def _dumps(data: dict) -> str:
    """JSON indented down to the detections, one line each: readable, and a photo's hundred
    detections stay a hundred lines."""

    def image(entry: dict) -> str:
        head = json.dumps({key: value for key, value in entry.items() if key != "detections"})
        lines = ",\n".join(f"   {json.dumps(d)}" for d in entry["detections"])
        return head[:-1] + ', "detections": ' + (f"[\n{lines}\n  ]}}" if lines else "[]}")

    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"  {image(v) if key == 'images' else json.dumps(v)}" for v in value)
            parts.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(_dumps(data))
    tmp.replace(path)  # never a half-written file beside finished pictures


def predict_images(
    *,
    checkpoint: str | os.PathLike,
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    score_threshold: float = 0.5,
    device: str | None = None,
    batch_size: int = 4,
    min_size: int | None = None,
    max_size: int | None = None,
    workers: int = 2,
) -> PredictSummary:
    """Detect in every image ``inputs`` name and write ``out_dir/predictions.json`` and
    ``out_dir/pictures/`` (see the module docstring). Raises CheckpointError or PredictError
    (one line) before reading any image; unreadable images only warn."""
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be at least 1")
    if not 0.0 <= score_threshold <= 1.0:
        raise PredictError(f"--score-threshold {score_threshold}: must be in [0, 1]")
    target = resolve_device(device)
    loaded = load_checkpoint(checkpoint)
    resize = {"min_size_test": min_size, "max_size_test": max_size}
    model = build_eval_model(
        loaded, inference_args={key: value for key, value in resize.items() if value is not None}
    ).to(target)
    num_classes = int(model.model_args["num_classes"])
    ids, names = category_tables(loaded, num_classes)
    files, failed = expand_inputs(inputs)
    for failure in failed:
        logger.warning("%s: skipped: %s", failure["file"], failure["reason"])
    out_dir = Path(out_dir)
    pictures_dir = out_dir / "pictures"
    pictures_dir.mkdir(parents=True, exist_ok=True)
    picture_of = picture_names(files)
    results: list[dict] = []
    saving: deque[Future] = deque()
    start = time.perf_counter()

    def flush(batch: list[tuple[Path, Tensor]], pool: ThreadPoolExecutor) -> None:
        images = [image.to(target).float().div_(255) for _, image in batch]
        detections = detect_above(model, images, score_threshold=score_threshold)
        for (path, image), detection in zip(batch, detections, strict=True):
            # Outputs without a category (the ids COCO skipped, in torchvision's model) are
            # never reported.
            labels = detection["labels"].tolist()
            known = torch.tensor([label in ids for label in labels], dtype=torch.bool)
            detection = {key: value[known] for key, value in detection.items()}
            entry = image_entry(str(path), tuple(image.shape[-2:]), detection, ids, names)
            entry["picture"] = f"pictures/{picture_of[path]}"
            results.append(entry)
            saving.append(
                pool.submit(_save_picture, image, detection, names, pictures_dir / picture_of[path])
            )
            while len(saving) > 2 * batch_size:  # bounded: each holds an image and its masks
                saving.popleft().result()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        batch: list[tuple[Path, Tensor]] = []
        for path, image, reason in read_ahead(files, pool, ahead=2 * batch_size + workers):
            if image is None:
                logger.warning("%s: skipped: %s", path, reason)
                failed.append({"file": str(path), "reason": reason})
                continue
            batch.append((path, image))
            if len(batch) == batch_size:
                flush(batch, pool)
                batch = []
        if batch:
            flush(batch, pool)
        while saving:
            saving.popleft().result()
    seconds = time.perf_counter() - start
    categories = [{"id": ids[i], "name": names[i]} for i in sorted(ids)]
    json_path = out_dir / "predictions.json"
    _write_json(json_path, {
        "checkpoint": str(loaded.path), "score_threshold": score_threshold,
        "categories": categories, "images": results, "failed": failed,
    })  # fmt: skip
    return PredictSummary(
        images=len(results),
        detections=sum(len(entry["detections"]) for entry in results),
        failed=len(failed),
        seconds=seconds,
        device=target,
        score_threshold=score_threshold,
        json_path=json_path,
        pictures_dir=pictures_dir,
    )
