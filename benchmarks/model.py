"""Training and inference speed of our Mask R-CNN against torchvision's on the CPU.

    python benchmarks/model.py [--quick] [--iters N] [--threads T]

Both models are ResNet-50-FPN Mask R-CNNs with frozen BatchNorm, stem and res2 frozen
(torchvision's trainable_backbone_layers=3), 91 classes and the SAME weights (ours loaded with
``MaskRCNN.from_torchvision``). The box classifier is scaled so that inference yields many
detections (100 per image), so post-processing and mask pasting are measured realistically.
Inputs: 2 images per batch, 800x1088 and 800x1066 (``--quick``: 320x416 and 320x400) with
random shapes as ground truth for training.

torchvision runs twice: as it comes (NCHW, its default) and in channels-last, as an expert
would run it on a CPU: ``model.to(memory_format=torch.channels_last)``, channels-last input
images, and the batch its transform builds (a fresh NCHW tensor) converted to channels-last
before the backbone. Ours is channels-last by default (``channels_last=True``).

Each mode (inference, then training) runs one warm-up iteration per model, then ``--iters``
timed ones (10; ``--quick``: 1). The models take turns within an iteration, in a rotating
order, so that load from other processes affects all alike. Reported per model: the median
and the minimum wall time and the median process CPU time per batch; then the ratios
``torchvision time / ours`` (the speed-up of ours in images per second) against each
torchvision variant. On a shared machine the minimum is the least disturbed measurement.
"""

from __future__ import annotations

import argparse
import copy
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


def channels_last_torchvision(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's model in channels-last: weights, and the backbone's input. Its transform
    batches the images into a new NCHW tensor whatever their layout, so that batch is
    converted once before the backbone (what our model does)."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(memory_format=torch.channels_last),)
    )
    return model


def channels_last_images(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """[3, H, W] images stored pixel by pixel (the strides of a channels-last batch)."""
    return [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in images]


def record_feature_layouts(models) -> tuple[dict[str, str], list]:
    """Hooks that note the layout of each model's first FPN level on its next call (to show
    that channels-last took effect); returns the notes and the hook handles."""
    layouts: dict[str, str] = {}

    def hook(name):
        def note(_module, _inputs, output):
            first = next(iter(output.values())) if isinstance(output, dict) else output[0]
            cl = first.is_contiguous(memory_format=torch.channels_last)
            layouts.setdefault(name, "channels-last" if cl else "NCHW")

        return note

    handles = [m.backbone.register_forward_hook(hook(name)) for name, m in models.items()]
    return layouts, handles


def run(steps, warmup: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for i in range(iters):  # rotate the order so that background load hits all alike
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(steps[name]))
    return times


# (what is compared, faster candidate, its baseline): each ratio is baseline time / candidate
# time, the candidate's speed-up in images per second.
COMPARISONS = [
    ("ours vs torchvision NCHW (its default)", "ours", "torchvision"),
    ("ours vs torchvision channels-last", "ours", "torchvision-cl"),
    ("torchvision channels-last vs torchvision NCHW", "torchvision-cl", "torchvision"),
]


def report(title: str, times, images_per_batch: int) -> dict[str, float]:
    """Print the per-model figures and the speed-ups; return the wall-median speed-ups."""
    print(f"\n{title} ({len(next(iter(times.values())))} iterations, {images_per_batch} img/batch)")
    stats = {}
    for name, ts in times.items():
        walls, cpus = [t[0] for t in ts], [t[1] for t in ts]
        stats[name] = (statistics.median(walls), min(walls), statistics.median(cpus))
        print(
            f"  {name:15s} wall median {stats[name][0]:7.3f} s/batch "
            f"({images_per_batch / stats[name][0]:6.3f} img/s), min {stats[name][1]:7.3f} s; "
            f"cpu median {stats[name][2]:7.3f} s"
        )
    ratios = {}
    for label, candidate, baseline in COMPARISONS:
        new, base = stats[candidate], stats[baseline]
        print(
            f"  {title} ratio, {label} ({baseline} time / {candidate} time): "
            f"wall median {base[0] / new[0]:.2f}x, wall min {base[1] / new[1]:.2f}x, "
            f"cpu median {base[2] / new[2]:.2f}x"
        )
        ratios[label] = base[0] / new[0]
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small images, 1 iteration")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-infer", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes, min_size, max_size, iters = [(320, 416), (320, 400)], 320, 533, 1
    else:
        sizes, min_size, max_size, iters = [(800, 1088), (800, 1066)], 800, 1333, 10
    iters = args.iters or iters

    reference = torchvision_model(min_size, max_size)
    ours = MaskRCNN.from_torchvision(
        reference.state_dict(),
        min_size_train=[min_size],
        max_size_train=max_size,
        min_size_test=min_size,
        max_size_test=max_size,
    )
    models = {
        "torchvision": reference,
        "torchvision-cl": channels_last_torchvision(reference),
        "ours": ours,
    }
    generator = torch.Generator().manual_seed(0)
    samples = [shapes_sample(h, w, 6, generator) for h, w in sizes]
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    inputs = {name: images for name in models}
    inputs["torchvision-cl"] = channels_last_images(images)
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, images {sizes}"
    )

    summary = {}
    # Inference first, at the weights chosen above: training would move the models away
    # from them (and apart from each other).
    if not args.skip_infer:
        counts = {name: [] for name in models}
        steps = {}
        for name, model in models.items():
            model.eval()
            steps[name] = infer_step(model, inputs[name], counts[name])
        layouts, handles = record_feature_layouts(models)
        times = run(steps, args.warmup, iters)
        for handle in handles:
            handle.remove()
        print(f"\nFPN feature layouts: {layouts}")
        summary["inference"] = report("inference", times, len(images))
        print(f"  detections per batch: { {n: c[-1] for n, c in counts.items()} }")

    if not args.skip_train:
        steps = {}
        for name, model in models.items():
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
            steps[name] = train_step(model, optimizer, inputs[name], targets)
        summary["training"] = report("training", run(steps, args.warmup, iters), len(images))

    print("\nsummary: wall-median ratios (baseline time / candidate time; > 1: candidate faster)")
    for mode, ratios in summary.items():
        for label, _, _ in COMPARISONS:
            print(f"  {mode:9s} {label:46s} {ratios[label]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
