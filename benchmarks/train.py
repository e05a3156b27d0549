"""Training throughput on the CPU: our whole training stack (``launch/train.py``) with 1 and 2
processes against torchvision's Mask R-CNN of the same size trained by a plain loop on the
same images, in the same run.

    python benchmarks/train.py            # 40 steps of 8 images per configuration
    python benchmarks/train.py --quick    # a smoke run (3 steps each, 40 images)
    ... --steps 80 --rounds 2 --data DIR  # longer, repeated, on a kept dataset

Data: ``pipeline.data.make_shapes_dataset`` (128 px, 1-4 shapes per image) written to a
temporary directory (or ``--data DIR``, reused when it exists), sharded with
``pipeline.data.sharding.build_shards``. Enough training images are generated that no
configuration crosses an epoch boundary.

Model, both sides: Mask R-CNN, ResNet-18 with trainable BatchNorm, everything trainable, FPN
P2-P6 of 64 channels, 4 classes, 128 px images (min = max size 128), anchor sizes, RPN and RoI
sampling sizes and head widths of configs/shapes_r18_cpu.yaml (box head 256, mask head 64),
SGD with the config's lr scaled to the global batch of 8, its momentum, weight decay and
warm-up. Random weights: the figure is speed, not accuracy.

Configurations (each a fresh subprocess; all on the same 2 cores):
- ours, 1 process: ``python launch/train.py`` with 8 images per step, OMP_NUM_THREADS=2.
- ours, 2 processes: ``torchrun --standalone --nproc-per-node=2 launch/train.py``, DDP over
  gloo, 4 images per process (global batch 8), OMP_NUM_THREADS=1 per process.
- torchvision: ``torchvision.models.detection.MaskRCNN`` built as above, a plain
  forward/backward/step loop in one process with 2 threads and batch 8. Its images come
  from the COCO json and the JPEGs through a torch DataLoader (``benchmarks.reference_eval.
  CocoInstances``: polygons to masks with pycocotools, random flips), or with
  ``--reference-data shards`` from the same shards through our loader (then the ratio
  measures the model and the loop only).
Every configuration has one DataLoader worker per training process.

Figures: images/s per step (global images / wall time of the step, loader wait included);
the median over the steps after the first ``--warmup`` of each run (``train.log_every=1``:
every step is a line of OUT/metrics.jsonl). The data-wait share is the mean over those steps
of the part of a step spent waiting for the next batch (ours: rank 0's). The ratios compare
medians measured in this run. The machine may be shared: the figures are as noisy as its load.
The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402  (yaml only: keeps this process light)

CONFIG = REPO / "configs" / "shapes_r18_cpu.yaml"
GLOBAL_BATCH = 8
CORES = 2
OURS = {1: "ours, 1 process", 2: "ours, 2 processes"}
REFERENCE = "torchvision"


def config_overrides(size: int, shards: Path) -> list[str]:
    """What every configuration shares, on top of configs/shapes_r18_cpu.yaml."""
    return [
        "model.backbone.norm=bn",
        "model.backbone.frozen_stages=0",
        f"input.min_size_train=[{size}]",
        f"input.max_size_train={size}",
        f"input.min_size_test={size}",
        f"input.max_size_test={size}",
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        "data.num_workers=1",
        "tracking.enabled=false",
    ]


# --- the data -------------------------------------------------------------------------------


def prepare_data(root: Path, train_images: int, size: int, seed: int) -> Path:
    """The shapes dataset under ``root`` (made unless there) and its shards; the shard dir."""
    from pipeline.data.shapes import make_shapes_dataset
    from pipeline.data.sharding import build_shards

    annotations = root / "annotations" / "instances_train.json"
    start = time.perf_counter()
    if annotations.exists():
        print(f"dataset: reusing {root}")
    else:
        make_shapes_dataset(root, train=train_images, val=0, size=size, seed=seed)
        print(f"dataset: {train_images} images of {size} px in {root}")
    shards = root / "shards" / "train"
    build_shards(annotations, root / "images" / "train", shards, shard_size=100, progress=False)
    print(f"data ready in {time.perf_counter() - start:.1f} s (shards in {shards})", flush=True)
    return shards


# --- running the configurations -------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_logged(command: list[str], env: dict[str, str], log_path: Path, what: str) -> float:
    """Run ``command`` with its output in ``log_path``; wall seconds. Stops on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{tail}\ntrain benchmark: {what} failed with exit code {code}")
    return time.perf_counter() - start


def run_ours(processes: int, overrides: list[str], steps: int, out: Path) -> list[dict]:
    """One training run of ``launch/train.py``; its metrics.jsonl records, one per step."""
    run_overrides = [
        *overrides,
        f"train.output_dir={out}",
        f"train.batch_size={GLOBAL_BATCH // processes}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.checkpoint_every={steps}",
        "train.resume=never",
        "distributed.backend=gloo",
    ]
    script = [str(REPO / "launch" / "train.py"), "--config", str(CONFIG), *run_overrides]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={processes}", *script]
    out.mkdir(parents=True, exist_ok=True)
    wall = run_logged(
        command, thread_env(CORES // processes), out.parent / f"{out.name}.log", OURS[processes]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"  {OURS[processes]}: {steps} steps, {wall:.1f} s with start-up", flush=True)
    return [
        {"images_per_s": r["images_per_s"], "data_wait_share": r["data_wait_share"]}
        for r in records
    ]


def run_reference(spec: dict, out: Path) -> list[dict]:
    """The torchvision loop in a subprocess (its own threads, like ours); per-step records."""
    spec_path = out.with_suffix(".spec.json")
    result_path = out.with_suffix(".result.json")
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    command = [sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(spec_path)]
    wall = run_logged(command, thread_env(CORES), out.with_suffix(".log"), REFERENCE)
    print(f"  {REFERENCE}: {spec['steps']} steps, {wall:.1f} s with start-up", flush=True)
    return json.loads(result_path.read_text())


# --- the torchvision reference (runs in its own process) -------------------------------------


def torchvision_model(cfg):
    """torchvision's MaskRCNN with the sizes of ``cfg``, as far as its constructor exposes
    them: ResNet-18 FPN with trainable BatchNorm (resnet_fpn_backbone(norm_layer=BatchNorm2d,
    trainable_layers=5), but with cfg's FPN width), one anchor size per level, cfg's min/max
    size, RPN and RoI sampling sizes, box head width and mask head channels."""
    import torchvision
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    m, inp = cfg.model, cfg.input
    channels = m.backbone.fpn_channels
    resnet = getattr(torchvision.models, f"resnet{m.backbone.depth}")(
        weights=None, norm_layer=nn.BatchNorm2d
    )
    widths = [64, 128, 256, 512] if m.backbone.depth < 50 else [256, 512, 1024, 2048]
    backbone = BackboneWithFPN(  # what resnet_fpn_backbone builds, with another FPN width
        resnet,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=widths,
        out_channels=channels,
    )
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in m.anchors.sizes),
        aspect_ratios=(tuple(m.anchors.aspect_ratios),) * len(m.anchors.sizes),
    )
    roi, rpn, head_dim = m.roi_heads, m.rpn, m.roi_heads.box_head_dim
    mask_channels = roi.mask_head_channels
    return MaskRCNN(
        backbone,
        min_size=inp.min_size_train[0],
        max_size=inp.max_size_train,
        image_mean=inp.pixel_mean,
        image_std=inp.pixel_std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_head=TwoMLPHead(channels * 7 * 7, head_dim),
        box_predictor=FastRCNNPredictor(head_dim, m.num_classes),
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        mask_head=MaskRCNNHeads(channels, [mask_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, m.num_classes),
    )


def reference_batches(spec: dict, cfg):
    """Batches of 8 for the reference: from the COCO json + JPEGs, or from our shards."""
    import torch
    from torch.utils.data import DataLoader

    if spec["reference_data"] == "shards":
        from pipeline.data import build_train_loader

        yield from build_train_loader(cfg, 0, 1).forever()
        return
    from benchmarks.reference_eval import CocoInstances, collate, quiet_coco

    root = Path(spec["root"])
    coco = quiet_coco(root / "annotations" / "instances_train.json")
    loader = DataLoader(
        CocoInstances(coco, root / "images" / "train", flip=True),
        batch_size=GLOBAL_BATCH,
        shuffle=True,
        num_workers=1,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.data.seed),
    )
    while True:
        yield from loader


def reference_worker(spec_path: str) -> int:
    """Train the torchvision model for ``steps`` steps; write per-step records to the result."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(CORES)
    cfg = load_config(spec["config"], spec["overrides"] + [f"train.batch_size={GLOBAL_BATCH}"])
    t = cfg.train
    torch.manual_seed(t.seed)
    model = torchvision_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = t.lr * GLOBAL_BATCH / t.reference_batch_size
    optimizer = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def warmup(step: int) -> float:
        alpha = min(1.0, step / max(1, t.warmup_iters))
        return t.warmup_factor * (1 - alpha) + alpha

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    batches = reference_batches(spec, cfg)
    records = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        images, targets = next(batches)
        waited = time.perf_counter() - start
        targets = [{k: target[k] for k in ("boxes", "labels", "masks")} for target in targets]
        losses = model(list(images), targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - start
        records.append({"images_per_s": len(images) / elapsed, "data_wait_share": waited / elapsed})
    Path(spec["result"]).write_text(json.dumps(records))
    return 0


# --- the report -----------------------------------------------------------------------------


def summarize(records: list[dict]) -> dict:
    rates = [r["images_per_s"] for r in records]
    quartiles = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
    return {
        "steps_measured": len(rates),
        "images_per_s_median": round(statistics.median(rates), 3),
        "images_per_s_p25": round(quartiles[0], 3),
        "images_per_s_p75": round(quartiles[2], 3),
        "data_wait_share_mean": round(statistics.fmean(r["data_wait_share"] for r in records), 4),
    }


def report(figures: dict[str, dict], args) -> dict:
    reference = figures[REFERENCE]["images_per_s_median"]
    for name in OURS.values():
        figures[name]["ratio_vs_torchvision"] = round(
            figures[name]["images_per_s_median"] / reference, 3
        )
    figures[REFERENCE]["ratio_vs_torchvision"] = 1.0
    threads = {OURS[1]: "1 x 2 threads", OURS[2]: "2 x 1 thread", REFERENCE: "1 x 2 threads"}
    print(
        f"\ntraining throughput, {args.size} px, global batch {GLOBAL_BATCH}, "
        f"{args.steps} steps x {args.rounds} round(s), first {args.warmup} of each run skipped, "
        f"medians over the rest"
    )
    header = (
        f"  {'configuration':20s} {'processes':>14s} {'images/s median':>16s} "
        f"{'(p25-p75)':>15s} {'data wait':>10s} {'ours / torchvision':>19s}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name, f in figures.items():
        spread = f"{f['images_per_s_p25']:.2f}-{f['images_per_s_p75']:.2f}"
        print(
            f"  {name:20s} {threads[name]:>14s} {f['images_per_s_median']:16.2f} "
            f"{spread:>15s} {100 * f['data_wait_share_mean']:9.1f}% "
            f"{f['ratio_vs_torchvision']:18.2f}x"
        )
    source = (
        "the same shards through our loader"
        if args.reference_data == "shards"
        else "the COCO json and JPEGs through a torch DataLoader"
    )
    print(
        f"\nratio '{OURS[1]}' = median images/s of our launch/train.py in 1 process with 2 "
        f"threads / median images/s of torchvision's MaskRCNN in a plain loop in 1 process "
        f"with 2 threads: same model size, same {args.size} px images, same global batch "
        f"{GLOBAL_BATCH}, same 2 CPU cores, one DataLoader worker each."
    )
    print(
        f"ratio '{OURS[2]}' = median images/s of our launch/train.py under torchrun with 2 DDP "
        f"processes (gloo) of 1 thread and 4 images each / the same torchvision figure: same "
        f"global batch, images and 2 cores, split over 2 processes instead of 2 threads."
    )
    scaling = figures[OURS[2]]["images_per_s_median"] / figures[OURS[1]]["images_per_s_median"]
    print(f"ours, 2 processes / ours, 1 process: {scaling:.2f}x (the same 2 cores).")
    print(
        f"torchvision's images: {source}. Data wait: ours is rank 0's share of step time spent "
        f"in next(loader); torchvision's the same measured around its loop. Figures from a "
        f"shared machine are as noisy as its load."
    )
    return {
        "benchmark": "train",
        "image_size": args.size,
        "global_batch": GLOBAL_BATCH,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "reference_data": args.reference_data,
        "ours_2p_over_ours_1p": round(scaling, 3),
        "configurations": figures,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps each")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every configuration")
    parser.add_argument("--size", type=int, default=128, help="image side in px")
    parser.add_argument("--train-images", type=int, help="default: enough for one epoch")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--data", help="dataset root to reuse or write (default: a temp dir)")
    parser.add_argument(
        "--reference-data",
        choices=["coco", "shards"],
        default="coco",
        help="torchvision's input: COCO json + JPEGs (plain) or our shards and loader",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--reference-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_worker:
        return reference_worker(args.reference_worker)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and below --steps")
    # One epoch covers every run: no loader restarts at an epoch boundary inside the figures.
    images = args.train_images or max(5 * GLOBAL_BATCH, args.steps * GLOBAL_BATCH)

    work = Path(tempfile.mkdtemp(prefix="train-benchmark-"))
    try:
        root = Path(args.data) if args.data else work / "shapes"
        shards = prepare_data(root, images, args.size, args.seed)
        overrides = config_overrides(args.size, shards)
        load_config(CONFIG, overrides)  # a bad override fails here, in one line
        reference_spec = {
            "config": str(CONFIG),
            "overrides": overrides,
            "steps": args.steps,
            "root": str(root),
            "reference_data": args.reference_data,
        }
        records: dict[str, list[dict]] = {name: [] for name in [*OURS.values(), REFERENCE]}
        for round_index in range(args.rounds):
            order = [1, 2, REFERENCE] if round_index % 2 == 0 else [REFERENCE, 2, 1]
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            for item in order:
                if item == REFERENCE:
                    out = work / f"torchvision_r{round_index}"
                    runs = run_reference(reference_spec, out)
                else:
                    out = work / f"ours_{item}p_r{round_index}"
                    runs = run_ours(item, overrides, args.steps, out)
                    item = OURS[item]
                records[item] += runs[args.warmup :]
        figures = {name: summarize(steps) for name, steps in records.items()}
        result = report(figures, args)
    finally:
        if args.keep:
            print(f"run directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if all(math.isfinite(f["images_per_s_median"]) for f in figures.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
