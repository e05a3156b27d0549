"""The shard manifest (``index.json``) as the loaders and the evaluation read it, and the
rule that names a shard set (the dataset name its evaluation metrics are keyed by)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Folders of a COCO layout that say nothing of the dataset: skipped when naming it.
LAYOUT_FOLDERS = ("annotations", "shards", "images", "")
ANNOTATION_PREFIX = "instances_"


def safe_name(text: str) -> str:
    """``text`` as a dataset name that is safe in an MLflow metric key and as one path part:
    each run of characters other than letters, digits, ``_ . -`` becomes ``_`` (a ``/`` too:
    it separates the key's parts), leading and trailing ``_ . -`` go; "" for nothing left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")


def dataset_name(annotation_file: str | Path, folders: Iterable[str] | None = None) -> str:
    """The name of the shards built from ``annotation_file``: ``<folder>_<stem>``, where stem is
    the file's stem without a leading ``instances_`` and folder is the nearest of ``folders``
    (default: the file's own folders, innermost first) that is not a layout folder
    (annotations, shards, images) nor the stem itself, left out when the stem starts with
    it; made safe by :func:`safe_name`.
    ``data/coco/annotations/instances_val2017.json`` -> ``coco_val2017``,
    ``data/shapes/annotations/instances_val.json`` -> ``shapes_val``."""
    path = Path(annotation_file)
    stem = path.stem.removeprefix(ANNOTATION_PREFIX) or path.stem
    if folders is None:
        folders = [part.name for part in path.resolve().parents]
    folder = next((f for f in folders if f not in LAYOUT_FOLDERS and f != stem), "")
    parts = [stem] if not folder or stem.startswith(f"{folder}_") else [folder, stem]
    return "_".join(filter(None, map(safe_name, parts))) or "dataset"


class ManifestError(ValueError):
    """index.json is missing or malformed; the message is one line naming the file."""


@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class ShardManifest:
    root: Path
    shards: tuple[ShardInfo, ...]
    categories: tuple[dict, ...]
    """{"id": COCO id, "name": ..., "index": contiguous 1..K}, in COCO-id order."""
    total_samples: int
    source_file: str
    source_sha256: str
    name: str = ""
    """The dataset's name (index.json's "name"; for a manifest written before names were,
    :func:`dataset_name` of its source file, with the shard directory's folders)."""
    skipped_images: int = 0
    """Images of the annotation file that the shard build left out (see skipped.json)."""

    @property
    def num_classes(self) -> int:
        """Classes including the background (index 0)."""
        return len(self.categories) + 1

    @property
    def coco_to_contiguous(self) -> dict[int, int]:
        return {c["id"]: c["index"] for c in self.categories}

    @property
    def contiguous_to_coco(self) -> dict[int, int]:
        return {c["index"]: c["id"] for c in self.categories}

    @property
    def class_names(self) -> list[str]:
        """Names by contiguous index, "__background__" at 0."""
        return ["__background__"] + [c["name"] for c in self.categories]

    def shard_offsets(self) -> list[int]:
        """Global index of each shard's first sample (manifest order)."""
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard.samples
        return offsets


def read_manifest(shard_dir: str | Path) -> ShardManifest:
    root = Path(shard_dir)
    path = root / "index.json"
    try:
        index = json.loads(path.read_bytes())
    except FileNotFoundError:
        # The usual cause is shards never built (or data.*_shards mistyped): say how to build.
        raise ManifestError(
            f"{path}: no such file (no shards in {root}); build them with: python "
            f"launch/build_shards.py --annotations FILE --images DIR --out {root}"
        ) from None
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON: {error}") from None
    try:
        shards = tuple(
            ShardInfo(str(root / s["file"]), int(s["samples"]), str(s["sha256"]))
            for s in index["shards"]
        )
        categories = tuple(
            {"id": c["id"], "name": c["name"], "index": int(c["index"])}
            for c in index["categories"]
        )
        return ShardManifest(
            root=root,
            shards=shards,
            categories=categories,
            total_samples=int(index["total_samples"]),
            source_file=index["source"]["file"],
            source_sha256=index["source"]["sha256"],
            name=safe_name(str(index.get("name") or ""))
            or dataset_name(index["source"]["file"], _folders(root)),
            skipped_images=int(index.get("skipped_images", 0)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{path}: malformed manifest: {error!r}") from None


def _folders(root: Path) -> list[str]:
    """The shard directory's folder names, innermost first (``data/shapes/shards/val`` ->
    val, shards, shapes, data, ...)."""
    resolved = root.resolve()
    return [resolved.name, *(part.name for part in resolved.parents)]
