"""Data-stage throughput: shard building with 1 and 2 workers, and the training loader
from shards against the usual way of reading COCO (torchvision CocoDetection + pycocotools
annToMask), with the same transforms, DataLoader workers and batch size, in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/data.py            # 400 images at 512 px
    PYTHONPATH=. .venv/bin/python benchmarks/data.py --quick    # a smoke run
    ... --min-sizes 480 512 544 --max-size 800                  # other training scales

The resize scales come from the demo config (configs/shapes_r18_cpu.yaml) unless given.
The shared transforms (resize of image and masks) weigh more at larger scales, so the
ratio shrinks there: it measures what the shard format changes (reading, JPEG decoding,
masks from RLE instead of polygons, batch transfer), not the common work.

Every figure is the median over ``--repeats`` runs; the two loaders alternate so that load
from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
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
from pipeline.data.loader import ShardTrainLoader
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.data.transforms import collate, flip_and_resize, to_float

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
        baseline_data = CocoBaseline(str(images_dir), str(annotations), **common)
        baseline_loader = DataLoader(
            baseline_data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            collate_fn=collate, drop_last=False,
        )  # fmt: skip
        rates = {"shards": [], "baseline": []}
        cpu_rates = {"shards": [], "baseline": []}
        for _ in range(args.repeats):
            for name, batches in (("shards", shard_loader), ("baseline", baseline_loader)):
                wall, cpu, count = time_epoch(batches)
                rates[name].append(count / wall)
                cpu_rates[name].append(count / cpu)
        median = {name: statistics.median(values) for name, values in rates.items()}
        cpu_median = {name: statistics.median(values) for name, values in cpu_rates.items()}
        print(
            f"training loader, {args.workers} workers, batch {args.batch_size}, "
            f"min sizes {args.min_sizes}, max {args.max_size} "
            f"(medians of {args.repeats}; images/s wall | images per CPU-second):"
        )
        for name, label in (("shards", "shards (WebDataset)"), ("baseline", "CocoDetection")):
            print(f"  {label:24s} {median[name]:8.1f} | {cpu_median[name]:8.1f}")
        print(
            f"  ratio shards / baseline  {median['shards'] / median['baseline']:8.2f} | "
            f"{cpu_median['shards'] / cpu_median['baseline']:8.2f}"
        )
        print(f"  all wall rates: {rates}".replace("], ", "],\n                  "))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
