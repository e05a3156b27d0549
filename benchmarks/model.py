"""Training and inference speed of our Mask R-CNN against torchvision's on the CPU.

    python benchmarks/model.py [--quick] [--iters N] [--threads T]

Both models are ResNet-50-FPN Mask R-CNNs with frozen BatchNorm, stem and res2 frozen
(torchvision's trainable_backbone_layers=3), 91 classes and the SAME weights (ours loaded with
``MaskRCNN.from_torchvision``). The box classifier is scaled so that inference yields many
detections (100 per image), so post-processing and mask pasting are measured realistically.
Inputs: 2 images per batch, 800x1088 and 800x1066 (``--quick``: 320x416 and 320x400) with
random shapes as ground truth for training. Iterations of the two models alternate, so load
from other processes affects both alike. Reported: the median and the minimum wall time and the
median process CPU time per batch, and their ratios (torchvision time / ours = speed-up in
images per second). On a shared machine the minimum is the least disturbed measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.modeling import MaskRCNN


def torchvision_model(min_size: int, max_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers=3)
    model = torchvision.models.detection.MaskRCNN(
        backbone, num_classes=91, min_size=min_size, max_size=max_size
    )
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.mul_(30.0)  # many confident, varied detections
        predictor.cls_score.bias[1:6] += 4.0
    return model


def shapes_sample(height: int, width: int, num_objects: int, generator: torch.Generator):
    """A noisy background with ``num_objects`` coloured rectangles and ellipses, and targets."""
    image = torch.rand(3, height, width, generator=generator) * 0.2 + 0.3
    ys = torch.arange(height)[:, None].float()
    xs = torch.arange(width)[None, :].float()
    boxes, labels, masks = [], [], []
    for _ in range(num_objects):
        w, h = (torch.rand(2, generator=generator) * 0.3 + 0.05).tolist()
        w, h = w * width, h * height
        x1 = float(torch.rand(1, generator=generator)) * (width - w)
        y1 = float(torch.rand(1, generator=generator)) * (height - h)
        if torch.rand(1, generator=generator) < 0.5:
            mask = (xs >= x1) & (xs < x1 + w) & (ys >= y1) & (ys < y1 + h)
        else:
            cx, cy = x1 + w / 2, y1 + h / 2
            mask = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
        image[:, mask] = torch.rand(3, 1, generator=generator)
        boxes.append([x1, y1, x1 + w, y1 + h])
        labels.append(int(torch.randint(1, 91, (1,), generator=generator)))
        masks.append(mask.to(torch.uint8))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks),
    }
    return image, target


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def train_step(model, optimizer, images, targets):
    def step():
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


def infer_step(model, images, counts):
    def step():
        with torch.no_grad():
            counts.append(sum(len(d["boxes"]) for d in model(images)))

    return step


def run(models, steps, warmup: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    for _ in range(warmup):
        for name in models:
            steps[name]()
    times = {name: [] for name in models}
    names = list(models)
    for i in range(iters):  # alternate (and swap the order) so background load hits both alike
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(steps[name]))
    return times


def report(title: str, times, images_per_batch: int) -> None:
    print(f"\n{title} ({len(next(iter(times.values())))} iterations, {images_per_batch} img/batch)")
    stats = {}
    for name, ts in times.items():
        walls, cpus = [t[0] for t in ts], [t[1] for t in ts]
        stats[name] = (statistics.median(walls), min(walls), statistics.median(cpus))
        print(
            f"  {name:12s} wall median {stats[name][0]:7.3f} s/batch "
            f"({images_per_batch / stats[name][0]:6.3f} img/s), min {stats[name][1]:7.3f} s; "
            f"cpu median {stats[name][2]:7.3f} s"
        )
    tv, ours = stats["torchvision"], stats["ours"]
    print(
        f"  speed-up ours/torchvision: wall median {tv[0] / ours[0]:.2f}x, "
        f"wall min {tv[1] / ours[1]:.2f}x, cpu median {tv[2] / ours[2]:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small images, 1 iteration")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-infer", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes, min_size, max_size, warmup, iters = [(320, 416), (320, 400)], 320, 533, 1, 1
    else:
        sizes, min_size, max_size, warmup, iters = [(800, 1088), (800, 1066)], 800, 1333, 1, 4
    iters = args.iters or iters

    reference = torchvision_model(min_size, max_size)
    ours = MaskRCNN.from_torchvision(
        reference.state_dict(),
        min_size_train=[min_size],
        max_size_train=max_size,
        min_size_test=min_size,
        max_size_test=max_size,
    )
    models = {"torchvision": reference, "ours": ours}
    generator = torch.Generator().manual_seed(0)
    samples = [shapes_sample(h, w, 6, generator) for h, w in sizes]
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, images {sizes}"
    )

    # Inference first, at the weights chosen above: training would move both models away
    # from them (and apart from each other).
    if not args.skip_infer:
        counts = {name: [] for name in models}
        steps = {}
        for name, model in models.items():
            model.eval()
            steps[name] = infer_step(model, images, counts[name])
        times = run(models, steps, warmup, iters)
        report("inference", times, len(images))
        print(f"  detections per batch: { {n: c[-1] for n, c in counts.items()} }")

    if not args.skip_train:
        steps = {}
        for name, model in models.items():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
            steps[name] = train_step(model, optimizer, images, targets)
        report("training", run(models, steps, warmup, iters), len(images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
