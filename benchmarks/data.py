"""Data-stage throughput: shard building with 1 and 2 workers, and the training loader
from shards against two ways of reading the plain COCO files (the json and one image file per
image), with the same transforms, DataLoader workers and batch size, in the same run:

* plain baseline: the usual way, torchvision CocoDetection (PIL decoding) + pycocotools
  annToMask per annotation, per-sample DataLoader collation;
* matched baseline: the shard loader's own pipeline on the plain files: the same decoder
  (torchvision.io decode_jpeg on the file bytes), masks decoded from the annotations' RLE
  (polygons converted as the shard builder does), the same augmentation draws, and whole
  batches built and packed in the workers (as many as the shard loader's).

shards / plain is the total gain of this data stage over the usual reading; shards / matched
is the share of it that the shard format itself brings (tar reading, RLE precomputed at build
time); matched / plain is the share of the decoding and batching choices.

    PYTHONPATH=. .venv/bin/python benchmarks/data.py            # 400 images at 512 px
    PYTHONPATH=. .venv/bin/python benchmarks/data.py --quick    # a smoke run
    ... --min-sizes 480 512 544 --max-size 800                  # other training scales

The resize scales come from the demo config (configs/shapes_r18_cpu.yaml) unless given.
The shared transforms (resize of image and masks) weigh more at larger scales, so the
ratios shrink there: they measure what the reading changes (file format, JPEG decoding,
masks from RLE instead of polygons, batch transfer), not the common work. The shapes
dataset stores its masks as compressed RLE already, so here the matched baseline converts
nothing; on COCO (polygons) it would rasterise them on every read, which shards do once.

Every figure is the median over ``--repeats`` runs; the three loaders take turns in a
rotating order so that load from other processes on the machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import pil_to_tensor

from pipeline.config import load_config
from pipeline.data.coco import segmentation_to_rle
from pipeline.data.loader import ShardTrainLoader, make_dataloader
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.data.transforms import (
    collate,
    decode_image,
    decode_masks,
    flip_and_resize,
    pack_batch,
    rle_extents,
    to_float,
    training_annotations,
    unpack_batch,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
REPO = Path(__file__).resolve().parents[1]


class CocoBaseline(Dataset):
    """The usual reading: PIL decode, annToMask per annotation (polygon rasterisation),
    then the very transforms the shard loader applies."""

    def __init__(self, root, annotations, *, min_sizes, max_size, flip_prob, seed):
        self.coco_dataset = CocoDetection(root, annotations)
        coco: COCO = self.coco_dataset.coco
        self.coco = coco
        ordered = sorted(coco.getCatIds())
        self.category_index = {cat: i + 1 for i, cat in enumerate(ordered)}
        self.min_sizes, self.max_size = min_sizes, max_size
        self.flip_prob, self.seed = flip_prob, seed

    def __len__(self):
        return len(self.coco_dataset)

    def __getitem__(self, index):
        image, annotations = self.coco_dataset[index]
        image = pil_to_tensor(image.convert("RGB"))
        annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
            dtype=torch.float32,
        ).reshape(-1, 4)
        labels = torch.tensor([self.category_index[a["category_id"]] for a in annotations])
        height, width = image.shape[-2:]
        if annotations:
            masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in annotations])
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        rng = random.Random(f"{self.seed}/{index}")
        image, target = flip_and_resize(
            image, boxes, labels.to(torch.int64), masks, self.coco_dataset.ids[index],
            min_size=rng.choice(self.min_sizes), max_size=self.max_size,
            flip=rng.random() < self.flip_prob,
        )  # fmt: skip
        return to_float([image])[0], target  # in the worker, like ConvertImageDtype


class CocoFilesBatches(Dataset):
    """The matched baseline: the plain COCO json and image files through the shard loader's
    pipeline. Item ``b`` is batch ``b`` of a seeded shuffle, built and packed in the worker
    (``pack_batch``) from the file bytes, decoded and augmented exactly as ``make_example``
    does a shard sample, with the same per-position augmentation draws."""

    def __init__(self, root, annotations, *, batch_size, min_sizes, max_size, flip_prob, seed):
        with open(annotations) as file:
            coco = json.load(file)
        self.root = Path(root)
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in coco["images"]}
        for annotation in coco["annotations"]:
            by_image[annotation["image_id"]].append(annotation)
        self.images = [(image, by_image[image["id"]]) for image in coco["images"]]
        ordered = sorted(category["id"] for category in coco["categories"])
        self.category_index = {cat: i + 1 for i, cat in enumerate(ordered)}
        self.order = list(range(len(self.images)))
        random.Random(f"order/{seed}").shuffle(self.order)
        self.batch_size, self.min_sizes, self.max_size = batch_size, min_sizes, max_size
        self.flip_prob, self.seed = flip_prob, seed

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def example(self, position: int):
        image_record, annotations = self.images[self.order[position]]
        path = self.root / image_record["file_name"]
        height, width = image_record["height"], image_record["width"]
        image = decode_image(path.read_bytes(), path.suffix[1:].lower())
        record = {
            "height": height,
            "width": width,
            "annotations": [
                {**a, "segmentation": segmentation_to_rle(a["segmentation"], height, width)}
                for a in annotations
            ],
        }
        boxes, labels, rles = training_annotations(record, self.category_index)
        rng = random.Random(f"aug/{self.seed}/0/{position}")  # the shard loader's draws
        min_size, flip = rng.choice(self.min_sizes), rng.random() < self.flip_prob
        return flip_and_resize(
            image, boxes, labels, decode_masks(rles, height, width), image_record["id"],
            min_size=min_size, max_size=self.max_size, flip=flip, mask_extents=rle_extents(rles),
        )  # fmt: skip

    def __getitem__(self, batch):
        first = batch * self.batch_size
        positions = range(first, min(first + self.batch_size, len(self.images)))
        return pack_batch([self.example(position) for position in positions])


def unpacked(packed_batches):
    for packed in packed_batches:
        yield unpack_batch(packed)


def time_epoch(batches) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process and its reaped DataLoader workers) and
    images of one pass. CPU time is the steadier figure on a machine shared with others."""
    start, cpu_start = time.perf_counter(), os.times()
    images = sum(len(batch[0]) for batch in batches)
    wall, cpu_end = time.perf_counter() - start, os.times()
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])  # user, system, children user, children sys
    return wall, cpu, images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--config", default=str(REPO / "configs" / "shapes_r18_cpu.yaml"),
        help="config whose input.min_size_train / max_size_train the transforms use",
    )  # fmt: skip
    parser.add_argument("--min-sizes", type=int, nargs="+", help="override the config's")
    parser.add_argument("--max-size", type=int, help="override the config's")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    args.min_sizes = args.min_sizes or config.input.min_size_train
    args.max_size = args.max_size or config.input.max_size_train
    if args.quick:
        args.images, args.size, args.repeats = 40, 256, 1
    torch.set_num_threads(1)  # the DataLoader workers are the parallelism, as in training

    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        paths = make_shapes_dataset(work / "shapes", args.images, 0, args.size, seed=0)
        annotations, images_dir = paths["train"], work / "shapes" / "images" / "train"
        print(f"dataset: {args.images} shapes images of up to {args.size} px in {work}")

        shard_size = max(1, math.ceil(args.images / 8))
        for workers in (1, 2):
            rates = []
            for repeat in range(args.repeats):
                out = work / f"shards-{workers}-{repeat}"
                start = time.perf_counter()
                build_shards(annotations, images_dir, out, shard_size=shard_size,
                             workers=workers, progress=False)  # fmt: skip
                rates.append(args.images / (time.perf_counter() - start))
            print(f"shard building, {workers} worker(s): {statistics.median(rates):8.1f} images/s")
        shards = work / "shards-2-0"

        common = dict(min_sizes=args.min_sizes, max_size=args.max_size, flip_prob=0.5, seed=0)
        shard_loader = ShardTrainLoader(
            str(shards), rank=0, world_size=1, batch_size=args.batch_size,
            num_workers=args.workers, shuffle_buffer=64, epoch_samples=args.images,
            min_sizes=common["min_sizes"], max_size=args.max_size, seed=0,
        )  # fmt: skip
        plain_data = CocoBaseline(str(images_dir), str(annotations), **common)
        plain_loader = DataLoader(
            plain_data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            collate_fn=collate, drop_last=False,
        )  # fmt: skip
        matched_data = CocoFilesBatches(
            str(images_dir), str(annotations), batch_size=args.batch_size, **common
        )
        loaders = {
            "shards": lambda: shard_loader,
            "matched": lambda: unpacked(
                make_dataloader(matched_data, args.workers, args.batch_size)
            ),
            "plain": lambda: plain_loader,
        }
        labels = {
            "shards": "shards (WebDataset, ours)",
            "matched": "COCO files, our pipeline",
            "plain": "CocoDetection+annToMask",
        }
        rates = {name: [] for name in loaders}
        cpu_rates = {name: [] for name in loaders}
        names = list(loaders)
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                wall, cpu, count = time_epoch(loaders[name]())
                rates[name].append(count / wall)
                cpu_rates[name].append(count / cpu)
        median = {name: statistics.median(values) for name, values in rates.items()}
        cpu_median = {name: statistics.median(values) for name, values in cpu_rates.items()}
        print(
            f"training loader, {args.workers} workers, batch {args.batch_size}, "
            f"min sizes {args.min_sizes}, max {args.max_size} "
            f"(medians of {args.repeats}; images/s wall | images per CPU-second):"
        )
        for name, label in labels.items():
            print(f"  {label:26s} {median[name]:8.1f} | {cpu_median[name]:8.1f}")
        for label, candidate, baseline in (
            ("total gain: shards vs plain baseline", "shards", "plain"),
            ("shard format's share: shards vs matched baseline", "shards", "matched"),
            ("pipeline's share: matched vs plain baseline", "matched", "plain"),
        ):
            print(
                f"  ratio {candidate} / {baseline} ({label}): "
                f"{median[candidate] / median[baseline]:.2f} wall | "
                f"{cpu_median[candidate] / cpu_median[baseline]:.2f} CPU"
            )
        print(f"  all wall rates: {rates}".replace("], ", "],\n                  "))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
