"""The shard manifest (``index.json``) as the loaders and the evaluation read it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{path}: malformed manifest: {error!r}") from None
