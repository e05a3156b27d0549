"""The reference our demo has to beat: torchvision's Mask R-CNN trained from scratch on the
project's shapes dataset, on the CPU, with its segm/bbox AP and training speed.

    python benchmarks/demo_reference.py [--quick] [--steps N] [--lr-step S] [--batch B]

Model: torchvision ``MaskRCNN`` on a ResNet-18 FPN backbone with 64 FPN channels (P2-P5 and
the max-pooled P6), 4 classes (background + circle, square, triangle), images kept at 128 px
(min_size = max_size = 128). Head sizes, anchors (16-256 px) and RPN/RoI sampling are those of
our demo model (``HEADS``, from configs/shapes_r18_cpu.yaml), so the two differ in
implementation, not in size; the rest is torchvision's defaults. From scratch: no pretrained
weights, trainable BatchNorm (``nn.BatchNorm2d``), all five stages trainable.
Training: SGD (lr 0.02, momentum 0.9, weight decay 1e-4), linear warmup over 50 steps from
lr/1000, the lr cut tenfold at ``--lr-step``, 8 images a step, random horizontal flips, one
process on ``--threads`` (2) cores, one DataLoader worker.

Data: ``pipeline.data.make_shapes_dataset`` with its defaults (128 px, 1-4 occluding shapes),
1000 training images (550 steps x 8 images = 4.4 epochs: enough passes to converge without
the set being so small that it is memorised) and 200 validation images drawn independently,
read straight from the COCO json and the JPEGs (``reference_eval.CocoInstances``). Scored
with pycocotools COCOeval (bbox and segm) on the validation split.

Measured with the defaults (550 steps, lr cut at 450), seed 0, on the 2 cores of the
development machine shared with other jobs (load 4-6, nice 19): segm AP 0.458 / AP50 0.652,
bbox AP 0.469 / AP50 0.673, 0.95 images/s (78 min of training). images/s follows the
machine's load; the APs do not. On the same machine idle, ``--steps 300 --lr-step 246``
gave segm AP 0.260 / AP50 0.443 at 5.43 images/s; our model in this script's loop with the
same 128/128 sampling gave 0.264 / 0.459 at 8.84 images/s (2026-11-30). ``--quick`` (60
steps, 240/50 images) is a smoke run: its APs are near zero. The last line printed is a
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_eval import CocoInstances, collate, evaluate, quiet_coco
from pipeline.data.shapes import CATEGORIES, DEFAULT_SIZE, make_shapes_dataset

WARMUP_STEPS = 50
WARMUP_FACTOR = 1e-3
# Heads, anchors and sampling as in configs/shapes_r18_cpu.yaml (fixed here: the reference
# must not move when our config does). torchvision's defaults (1024-d box head, 256-channel
# mask convs, 512 RoIs and 2000 proposals an image) cost ~530 GFLOP a training step on these
# 128 px images against ~50 GFLOP: 10x slower, for a 128 px, 3-class task.
HEADS = {
    "anchor_sizes": [16, 32, 64, 128, 256],
    "rpn_pre_nms_top_n_train": 600,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 150,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 128,
    "box_head_dim": 256,
    "mask_head_channels": 64,
}


def reference_model(image_size: int, fpn_channels: int = 64) -> MaskRCNN:
    """torchvision Mask R-CNN, ResNet-18 FPN, trainable BatchNorm, random weights, with the
    head sizes, anchors and sampling of our demo model (``HEADS``)."""
    resnet = torchvision.models.resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    # What resnet_fpn_backbone(trainable_layers=5) builds, but with fewer FPN channels.
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=fpn_channels,
    )
    box_dim, mask_channels = HEADS["box_head_dim"], HEADS["mask_head_channels"]
    classes = len(CATEGORIES) + 1
    resolution = 7  # torchvision's box RoI pooling output size
    anchors = AnchorGenerator(
        tuple((size,) for size in HEADS["anchor_sizes"]),
        ((0.5, 1.0, 2.0),) * len(HEADS["anchor_sizes"]),
    )
    return MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=HEADS["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=HEADS["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=HEADS["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=HEADS["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=HEADS["rpn_batch_size_per_image"],
        box_batch_size_per_image=HEADS["box_batch_size_per_image"],
        box_head=TwoMLPHead(fpn_channels * resolution**2, box_dim),
        box_predictor=FastRCNNPredictor(box_dim, classes),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, classes),
    )


def lr_factor(step: int, lr_step: int) -> float:
    """Linear warmup from WARMUP_FACTOR over WARMUP_STEPS, then x0.1 from ``lr_step`` on."""
    warmup = 1.0
    if step < WARMUP_STEPS:
        alpha = step / WARMUP_STEPS
        warmup = WARMUP_FACTOR * (1 - alpha) + alpha
    return warmup * (0.1 if step >= lr_step else 1.0)


def single_threaded_worker(_):
    torch.set_num_threads(1)  # the main process owns the cores for the model


def batches_forever(loader: DataLoader):
    while True:
        yield from loader


def train(model, loader, steps: int, lr: float, lr_step: int, log_every: int) -> float:
    """Train for ``steps`` steps; return the wall time in seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, lr_step))
    model.train()
    batches = batches_forever(loader)
    start = time.perf_counter()
    for step in range(steps):
        images, targets = next(batches)
        targets = [{k: v for k, v in t.items() if k != "image_id"} for t in targets]
        losses = model(list(images), targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"step {step}: loss is {loss.item()} ({losses})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            parts = " ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())
            print(
                f"step {step + 1:4d}/{steps}  loss {loss.item():.3f} ({parts})  "
                f"lr {optimizer.param_groups[0]['lr']:.4f}  {elapsed:6.0f} s",
                flush=True,
            )
    return time.perf_counter() - start


def dataset_root(args, work: Path) -> Path:
    """``--data`` if it holds a dataset, else a fresh one written there (or under ``work``)."""
    root = Path(args.data) if args.data else work / "shapes"
    if not (root / "annotations" / "instances_train.json").exists():
        start = time.perf_counter()
        make_shapes_dataset(root, args.train_images, args.val_images, args.size, args.seed)
        print(
            f"dataset: {args.train_images} train / {args.val_images} val images of "
            f"{args.size} px, seed {args.seed}, in {root} ({time.perf_counter() - start:.1f} s)"
        )
    else:
        print(f"dataset: reusing {root}")
    return root


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--steps", type=int, default=550, help="training steps")
    parser.add_argument("--lr-step", type=int, default=450, help="step of the tenfold lr cut")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the process")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in px")
    parser.add_argument("--seed", type=int, default=0, help="dataset and model seed")
    parser.add_argument("--data", help="dataset root to reuse or write (default: a temp dir)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.lr_step, args.log_every = 60, 50, 10
        args.train_images, args.val_images = 240, 50
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    work = Path(tempfile.mkdtemp(prefix="demo-reference-"))
    try:
        root = dataset_root(args, work)
        loaders = {}
        for split, flip, shuffle in (("train", True, True), ("val", False, False)):
            coco = quiet_coco(root / "annotations" / f"instances_{split}.json")
            dataset = CocoInstances(coco, root / "images" / split, flip=flip)
            loaders[split] = DataLoader(
                dataset, batch_size=args.batch, shuffle=shuffle, num_workers=args.workers,
                collate_fn=collate, drop_last=shuffle, worker_init_fn=single_threaded_worker,
                persistent_workers=args.workers > 0 and shuffle,
                generator=torch.Generator().manual_seed(args.seed),
            )  # fmt: skip
        model = reference_model(args.size)
        print(
            f"reference: torchvision MaskRCNN resnet18-FPN(64), {args.size} px, from scratch, "
            "demo-sized heads; "
            f"{args.steps} steps x {args.batch} images, lr {args.lr} cut x0.1 at {args.lr_step}, "
            f"{args.threads} threads, {args.workers} loader worker(s)",
            flush=True,
        )
        train_s = train(model, loaders["train"], args.steps, args.lr, args.lr_step, args.log_every)
        start = time.perf_counter()
        scores = evaluate(model, loaders["val"], loaders["val"].dataset.coco)
        eval_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    images_per_s = args.steps * args.batch / train_s
    figures = {
        "benchmark": "demo_reference",
        "steps": args.steps,
        "batch": args.batch,
        "lr_step": args.lr_step,
        "threads": args.threads,
        "train_images": len(loaders["train"].dataset),
        "val_images": len(loaders["val"].dataset),
        "train_wall_s": round(train_s, 1),
        "images_per_s": round(images_per_s, 2),
        "eval_wall_s": round(eval_s, 1),
        **{k: round(v, 4) for k, v in scores.items()},
    }
    print(f"steps:          {args.steps} x {args.batch} images")
    print(f"training:       {train_s:.1f} s wall, {images_per_s:.2f} images/s")
    print(f"evaluation:     {eval_s:.1f} s on {figures['val_images']} val images")
    print(f"bbox AP / AP50: {scores['bbox_ap']:.3f} / {scores['bbox_ap50']:.3f}")
    print(f"segm AP / AP50: {scores['segm_ap']:.3f} / {scores['segm_ap50']:.3f}")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
