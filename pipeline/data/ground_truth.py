"""The COCO ground truth of a shard set, for the evaluation: what the shards hold (crowd
annotations included, segmentations as compressed RLE), as a COCO annotation dictionary
that ``pycocotools.coco.COCO`` accepts. Images whose samples cannot be read are left out
with a warning, as the evaluation loader leaves them out."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

from .manifest import read_manifest

log = logging.getLogger(__name__)


def coco_ground_truth(shard_dir: str | Path) -> dict:
    """{"images", "annotations", "categories"} with COCO ids (not contiguous indices)."""
    manifest = read_manifest(shard_dir)
    images, annotations = [], []
    for shard in manifest.shards:
        try:
            records = list(shard_records(shard.path))
        except (OSError, tarfile.TarError, json.JSONDecodeError) as error:
            log.warning("ground truth: skipped unreadable %s: %s", shard.path, error)
            continue
        if len(records) < shard.samples:
            log.warning(
                "ground truth: %s holds %d of %d samples", shard.path, len(records), shard.samples
            )
        for record in records:
            images.append({key: record[key] for key in ("file_name", "height", "width")})
            images[-1]["id"] = record["image_id"]
            for annotation in record["annotations"]:
                annotations.append({**annotation, "image_id": record["image_id"]})
    categories = [{"id": c["id"], "name": c["name"]} for c in manifest.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def shard_records(path: str):
    """The JSON record of every sample in one shard, in order."""
    with tarfile.open(path) as tar:
        for info in tar:
            if info.isfile() and info.name.endswith(".json"):
                yield json.loads(tar.extractfile(info).read())
