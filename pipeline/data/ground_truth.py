"""The COCO ground truth of a shard set, for the evaluation: what the shards hold (crowd
annotations included, segmentations as compressed RLE), as a COCO annotation dictionary
that ``pycocotools.coco.COCO`` accepts.

Damage is contained to what is damaged: a record that does not parse is skipped alone, and
a shard that breaks off (truncated, bad header) keeps the records read before the break, as
the evaluation loader still yields those samples; the evaluation must never be handed a
result for an image its ground truth lacks. Each problem is warned about and listed by
``read_ground_truth``."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .manifest import read_manifest

log = logging.getLogger(__name__)

RECORD_KEYS = ("image_id", "file_name", "height", "width", "annotations")


def coco_ground_truth(shard_dir: str | Path) -> dict:
    """{"images", "annotations", "categories"} with COCO ids (not contiguous indices)."""
    return read_ground_truth(shard_dir)[0]


def read_ground_truth(shard_dir: str | Path) -> tuple[dict, list[dict]]:
    """The COCO ground truth dict, and the problems met: ``{"shard", "member", "reason"}``
    (member None for a shard that broke off or fell short)."""
    manifest = read_manifest(shard_dir)
    images, annotations, problems = [], [], []
    for shard in manifest.shards:
        count = 0
        for record in shard_records(shard.path, problems):
            count += 1
            images.append({key: record[key] for key in ("file_name", "height", "width")})
            images[-1]["id"] = record["image_id"]
            for annotation in record["annotations"]:
                annotations.append({**annotation, "image_id": record["image_id"]})
        if count < shard.samples:
            problems.append(
                {"shard": shard.path, "member": None,
                 "reason": f"{count} of {shard.samples} records readable"}
            )  # fmt: skip
            log.warning("ground truth: %s holds %d of %d records", shard.path, count, shard.samples)
    categories = [{"id": c["id"], "name": c["name"]} for c in manifest.categories]
    return {"images": images, "annotations": annotations, "categories": categories}, problems


def shard_records(path: str, problems: list[dict] | None = None) -> Iterator[dict]:
    """The JSON record of every readable sample of one shard, in order. A record that does
    not parse is skipped; a broken archive ends the shard after the records already read.
    Each problem is logged and appended to ``problems``."""

    def problem(member: str | None, error: Exception):
        reason = f"{type(error).__name__}: {error}"
        log.warning("ground truth: skipped %s%s: %s", path, f" member {member}" if member else "",
                    reason)  # fmt: skip
        if problems is not None:
            problems.append({"shard": path, "member": member, "reason": reason})

    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not (info.isfile() and info.name.endswith(".json")):
                    continue
                data = tar.extractfile(info).read()  # a truncated member ends the shard
                try:
                    record = json.loads(data)
                    missing = [key for key in RECORD_KEYS if key not in record]
                    if missing:
                        raise KeyError(f"record lacks {missing}")
                except (ValueError, KeyError, TypeError) as error:
                    problem(info.name, error)
                    continue
                yield record
    except (OSError, EOFError, tarfile.TarError) as error:
        problem(None, error)
