"""COCO -> WebDataset tar shards, reproducible to the byte, parallel, resumable and
splittable into a Slurm array.

Layout of ``out_dir``:

- ``shard-000000.tar`` ...: one sample per image, ``KEY.jpg`` (or ``.png``..., the original
  bytes, never re-encoded) then ``KEY.json`` (image_id, file_name, height, width and the
  annotations, each segmentation as compressed RLE). KEY is the zero-padded image id.
- ``shard-000000.json`` ...: a sidecar per shard, written atomically after its tar is
  complete: sample count, sha256, size, the images skipped and the annotations dropped, and
  a fingerprint of what the shard was built from (annotation file sha256, shard size).
- ``index.json``: the manifest the loader reads (shards with counts and sha256, category
  table, source file name and sha256, total, the dataset's ``name``: given, else
  :func:`~pipeline.data.manifest.dataset_name` of the annotation file, e.g. ``shapes_val``)
  and ``skipped.json``: everything left out.

Images are sorted by id and cut into shards of ``shard_size`` by position, BEFORE any image
is read, so a shard's content never depends on the worker count or on which Slurm task
built it; a bad image only makes its own shard one sample shorter.

Resume: a shard is kept when its sidecar's fingerprint matches, the tar's sha256 equals the
sidecar's and it skipped no image (those shards are retried, the image may be fixed);
everything else is rebuilt. Tars are written to a temporary name and renamed, so a crash
leaves no complete-looking partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from .coco import CocoSource, load_coco, segmentation_to_rle
from .manifest import dataset_name, safe_name

FORMAT_VERSION = "maskrcnn-shards/1"
INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def sample_key(image_id) -> str:
    """Tar member stem: no dots (WebDataset splits the extension at the first dot)."""
    if isinstance(image_id, int):
        return f"{image_id:012d}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(image_id))


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class BadImage(Exception):
    """An image that cannot be used; the message is the reason."""


def verify_image(data: bytes, height: int, width: int) -> str:
    """Decode the whole image (JPEGs at 1/8 scale: still every byte of the entropy-coded
    data, at a fraction of the cost) and return the file extension of its real format."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            if image.size != (width, height):
                raise BadImage(
                    f"size {image.size[0]}x{image.size[1]} differs from the annotation's "
                    f"{width}x{height}"
                )
            if image_format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:  # its message shows the BytesIO's repr, not a reason
        raise BadImage("not a decodable image: not a known image format") from None
    except Exception as error:  # PIL raises many types for broken files
        raise BadImage(f"not a decodable image: {error}") from None
    return {"JPEG": "jpg", "PNG": "png"}.get(image_format, str(image_format).lower())


def sample_annotations(image: dict, annotations: list[dict]):
    """The annotations of one sample with RLE segmentations, and those that could not be
    converted (as problem records)."""
    converted, problems = [], []
    height, width = image["height"], image["width"]
    for annotation in annotations:
        try:
            rle = segmentation_to_rle(annotation["segmentation"], height, width)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            problems.append(
                {
                    "annotation_id": annotation["id"],
                    "image_id": image["id"],
                    "reason": f"bad segmentation: {error}",
                }
            )
            continue
        area = annotation.get("area")
        if area is None:
            area = int(mask_utils.area(rle))
        converted.append(
            {
                "id": annotation["id"],
                "category_id": annotation["category_id"],
                "bbox": annotation["bbox"],
                "area": area,
                "iscrowd": int(annotation.get("iscrowd", 0)),
                "segmentation": rle,
            }
        )
    return converted, problems


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member with fixed metadata, so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ShardTask:
    index: int
    images: list[dict]
    """Image records, each with its annotations under "annotations"."""
    images_dir: str
    out_dir: str
    fingerprint: str


def build_one_shard(task: ShardTask) -> dict:
    """Write one shard and its sidecar; return the sidecar record."""
    out_dir = Path(task.out_dir)
    skipped, problems = [], []
    count = 0
    # Straight to a temporary file (a shard can be large), renamed once complete.
    shard_path = out_dir / shard_name(task.index)
    temporary = shard_path.with_name(f".{shard_path.name}.tmp-{os.getpid()}")
    with tarfile.open(temporary, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image in task.images:
            path = Path(task.images_dir) / image["file_name"]
            try:
                try:
                    data = path.read_bytes()
                except OSError as error:
                    raise BadImage(f"cannot read: {error.strerror or error}") from None
                extension = verify_image(data, image["height"], image["width"])
            except BadImage as error:
                skipped.append(
                    {
                        "image_id": image["id"],
                        "file_name": image["file_name"],
                        "reason": str(error),
                        "annotations": len(image["annotations"]),
                    }
                )
                continue
            annotations, bad = sample_annotations(image, image["annotations"])
            problems.extend(bad)
            record = {
                "image_id": image["id"],
                "file_name": image["file_name"],
                "height": image["height"],
                "width": image["width"],
                "annotations": annotations,
            }
            key = sample_key(image["id"])
            # The image first, then its JSON: a sample's files sit together.
            add_member(tar, f"{key}.{extension}", data)
            add_member(tar, f"{key}.json", canonical_json(record))
            count += 1
    size, digest = temporary.stat().st_size, sha256_file(temporary)
    os.replace(temporary, shard_path)
    sidecar = {
        "shard": shard_name(task.index),
        "fingerprint": task.fingerprint,
        "samples": count,
        "images": len(task.images),
        "bytes": size,
        "sha256": digest,
        "skipped_images": skipped,
        "dropped_annotations": problems,
    }
    write_atomically(out_dir / sidecar_name(task.index), canonical_json(sidecar))
    return sidecar


def fingerprint_of(source: CocoSource, shard_size: int, index: int) -> str:
    return hashlib.sha256(
        canonical_json([FORMAT_VERSION, source.sha256, shard_size, index])
    ).hexdigest()


def read_sidecar(out_dir: Path, index: int) -> dict | None:
    try:
        return json.loads((out_dir / sidecar_name(index)).read_bytes())
    except (OSError, json.JSONDecodeError):
        return None


def reusable_sidecar(out_dir: Path, index: int, fingerprint: str) -> dict | None:
    """The sidecar of a complete, intact shard built from the same input, else None."""
    sidecar = read_sidecar(out_dir, index)
    if sidecar is None or sidecar.get("fingerprint") != fingerprint:
        return None
    if sidecar.get("skipped_images"):  # retry: the missing or broken image may be fixed
        return None
    tar_path = out_dir / shard_name(index)
    if not tar_path.is_file() or tar_path.stat().st_size != sidecar.get("bytes"):
        return None
    return sidecar if sha256_file(tar_path) == sidecar.get("sha256") else None


@dataclass
class BuildSummary:
    out_dir: Path
    shards_built: list[int] = field(default_factory=list)
    shards_kept: list[int] = field(default_factory=list)
    samples: int = 0
    """Samples in the shards this call handled (built or kept)."""
    skipped_images: int = 0
    dropped_annotations: int = 0
    index: dict | None = None
    """The manifest, when this call wrote index.json."""

    def line(self) -> str:
        text = (
            f"{self.samples} samples in {len(self.shards_built) + len(self.shards_kept)} shards "
            f"({len(self.shards_built)} built, {len(self.shards_kept)} kept) in {self.out_dir}; "
            f"skipped {self.skipped_images} images, dropped {self.dropped_annotations} annotations"
        )
        if self.skipped_images or self.dropped_annotations:
            text += f" (see {self.out_dir / SKIPPED_NAME})"
        return text


def shard_tasks(source: CocoSource, images_dir, out_dir, shard_size: int) -> list[ShardTask]:
    tasks = []
    for index, start in enumerate(range(0, len(source.images), shard_size)):
        images = [
            {**image, "annotations": source.annotations_by_image[image["id"]]}
            for image in source.images[start : start + shard_size]
        ]
        fingerprint = fingerprint_of(source, shard_size, index)
        tasks.append(ShardTask(index, images, str(images_dir), str(out_dir), fingerprint))
    return tasks


def build_shards(
    annotations: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    workers: int = 1,
    shard_index: int = 0,
    num_shard_jobs: int = 1,
    merge: bool = True,
    progress: bool = True,
    name: str | None = None,
) -> BuildSummary:
    """Build the shards s with ``s % num_shard_jobs == shard_index`` (all by default) that
    are not already complete, then, if ``merge``, write index.json and skipped.json (with
    the dataset's ``name``, made safe; default: derived from the annotation file's path).
    Raises CocoFormatError for an invalid annotation file."""
    if shard_size < 1 or workers < 1 or not 0 <= shard_index < num_shard_jobs:
        raise ValueError("need shard_size >= 1, workers >= 1, 0 <= shard_index < num_shard_jobs")
    source = load_coco(annotations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BuildSummary(out_dir)
    tasks = [
        task
        for task in shard_tasks(source, images_dir, out_dir, shard_size)
        if task.index % num_shard_jobs == shard_index
    ]
    sidecars = {}
    todo = []
    for task in tasks:
        sidecar = reusable_sidecar(out_dir, task.index, task.fingerprint)
        if sidecar is None:
            todo.append(task)
        else:
            sidecars[task.index] = sidecar
            summary.shards_kept.append(task.index)
    with tqdm(
        total=sum(len(task.images) for task in todo),
        unit="img",
        desc="shards",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for sidecar in run_tasks(todo, workers):
            index = int(sidecar["shard"][len("shard-") : -len(".tar")])
            sidecars[index] = sidecar
            summary.shards_built.append(index)
            bar.update(sidecar["images"])
    summary.shards_built.sort()
    for sidecar in sidecars.values():
        summary.samples += sidecar["samples"]
        summary.skipped_images += len(sidecar["skipped_images"])
        summary.dropped_annotations += len(sidecar["dropped_annotations"])
    if merge:
        summary.index = merge_shards(source, out_dir, shard_size, name=name)
        summary.skipped_images = summary.index["skipped_images"]
        summary.dropped_annotations = summary.index["dropped_annotations"]
    return summary


def merge_only(
    annotations: str | Path, out_dir: str | Path, *, shard_size: int = 1000, name: str | None = None
) -> dict:
    """The last step of a Slurm array: check every shard and write index.json."""
    return merge_shards(load_coco(annotations), Path(out_dir), shard_size, name=name)


def run_tasks(tasks: list[ShardTask], workers: int):
    """Yield sidecars as shards complete; whole shards per worker process."""
    if workers == 1 or len(tasks) <= 1:
        yield from map(build_one_shard, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # ProcessPoolExecutor rather than multiprocessing.Pool: Pool's shutdown polls its
    # helper threads every 0.1 s, which cost a third of a second per run.
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        pending = [pool.submit(build_one_shard, task) for task in tasks]
        for future in as_completed(pending):
            yield future.result()


class IncompleteShards(RuntimeError):
    """Merging found shards missing or not matching the annotation file."""


def merge_shards(
    source: CocoSource, out_dir: Path, shard_size: int, name: str | None = None
) -> dict:
    """Check that every shard is complete and write index.json and skipped.json."""
    count = len(shard_tasks(source, "", out_dir, shard_size))
    shards, skipped_images, dropped = [], [], list(source.problems)
    missing = []
    for index in range(count):
        sidecar = read_sidecar(out_dir, index)
        tar_path = out_dir / shard_name(index)
        if (
            sidecar is None
            or sidecar.get("fingerprint") != fingerprint_of(source, shard_size, index)
            or not tar_path.is_file()
            or tar_path.stat().st_size != sidecar["bytes"]
        ):
            missing.append(shard_name(index))
            continue
        shards.append(
            {"file": sidecar["shard"], "samples": sidecar["samples"], "sha256": sidecar["sha256"]}
        )
        skipped_images += [
            {**item, "shard": sidecar["shard"]} for item in sidecar["skipped_images"]
        ]
        dropped += sidecar["dropped_annotations"]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise IncompleteShards(
            f"{out_dir}: {len(missing)} of {count} shards missing or stale ({shown}); "
            "build them first"
        )
    index = {
        "format": FORMAT_VERSION,
        "name": safe_name(name or "") or dataset_name(source.path),
        "source": {"file": source.path.name, "sha256": source.sha256},
        "shard_size": shard_size,
        "categories": source.categories,
        "shards": shards,
        "total_samples": sum(shard["samples"] for shard in shards),
        "skipped_images": len(skipped_images),
        "dropped_annotations": len(dropped),
    }
    dropped.sort(key=lambda item: str(item["annotation_id"]))
    write_atomically(
        out_dir / SKIPPED_NAME,
        json.dumps({"images": skipped_images, "annotations": dropped}, indent=1).encode(),
    )
    write_atomically(out_dir / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index
