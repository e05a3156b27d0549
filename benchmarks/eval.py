"""Evaluation-stage throughput: images/s of ``launch/evaluate.py`` in 1 and 2 processes, and
the COCOeval time of faster-coco-eval against pycocotools on the same detections.

    PYTHONPATH=. .venv/bin/python benchmarks/eval.py            # 64 images, 3 repeats
    PYTHONPATH=. .venv/bin/python benchmarks/eval.py --quick    # a smoke run

The model is the demo's (configs/shapes_r18_cpu.yaml: ResNet-18 FPN, 256 px test size) with
random weights whose box classifier is scaled so that every image gets the full 100
detections: the most work for mask pasting, RLE encoding and COCOeval per image.
Images/s is the evaluation's own figure (images over the slowest rank's inference time,
including pasting and RLE encoding; not the process start). Each process gets
cores / processes threads. The COCOeval figures are medians over ``--repeats`` runs of
bbox + segm on the detections the 1-process run wrote, the two backends alternating.
The last line is a JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pipeline.config import load_config, save_config
from pipeline.data.ground_truth import read_ground_truth
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards
from pipeline.evaluation.coco_eval import STAT_NAMES, coco_evaluate
from pipeline.modeling import MaskRCNN, model_args_from_config

warnings.filterwarnings("ignore", category=DeprecationWarning)
REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, images: int, size: int) -> Path:
    make_shapes_dataset(root, 0, images, size, seed=0)
    shards = root / "shards"
    build_shards(
        root / "annotations" / "instances_val.json",
        root / "images" / "val",
        shards,
        shard_size=max(1, images // 4),
        progress=False,
    )
    return shards


def make_checkpoint(cfg, path: Path) -> Path:
    torch.manual_seed(0)
    model = MaskRCNN(**model_args_from_config(cfg))
    with torch.no_grad():  # confident, varied classes: 100 detections per image pass 0.05
        model.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    torch.save({**model.checkpoint(), "step": 0, "tracking": {"run_id": None, "uri": None}}, path)
    return path


def run_evaluation(nproc: int, config: Path, checkpoint: Path, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(REPO / "launch" / "evaluate.py"), "--config",
        str(config), "--checkpoint", str(checkpoint), "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"evaluation with {nproc} processes failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": nproc,
        "threads_per_process": threads,
        "images": metrics["images_evaluated"],
        "images_per_s": metrics["images_per_s"],
        "inference_seconds": metrics["inference_seconds"],
        "wall_seconds": wall,
    }


def time_coco_eval(gt: dict, results: dict[str, list[dict]], repeats: int) -> dict:
    seconds = {"pycocotools": [], "faster": []}
    stats = {}
    for _ in range(repeats):
        for backend in seconds:  # alternate, so load from elsewhere hits both alike
            start = time.perf_counter()
            scores = {t: coco_evaluate(gt, r, t, backend=backend) for t, r in results.items()}
            seconds[backend].append(time.perf_counter() - start)
            stats[backend] = scores
    difference = max(
        abs(stats["faster"][t].stats[n] - stats["pycocotools"][t].stats[n])
        for t in results
        for n in STAT_NAMES
    )
    medians = {backend: statistics.median(values) for backend, values in seconds.items()}
    return {
        "detections": sum(len(r) for r in results.values()),
        "pycocotools_s": medians["pycocotools"],
        "faster_s": medians["faster"],
        "speedup": medians["pycocotools"] / medians["faster"],
        "max_stat_difference": difference,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="validation images")
    parser.add_argument("--size", type=int, default=256, help="image size of the shapes")
    parser.add_argument("--repeats", type=int, default=3, help="COCOeval repeats (median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 images, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 8, 1
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        tmp = Path(tmp)
        shards = make_data(tmp / "shapes", args.images, args.size)
        cfg = load_config(
            REPO / "configs" / "shapes_r18_cpu.yaml",
            [f"data.val_shards={shards}", "tracking.enabled=false", "eval.num_pictures=0",
             "data.num_workers=1", "eval.batch_size=2", "eval.backend=faster"],
        )  # fmt: skip
        config = save_config(cfg, tmp / "eval.yaml")
        checkpoint = make_checkpoint(cfg, tmp / "model.pt")
        runs = [run_evaluation(n, config, checkpoint, tmp / f"out{n}") for n in (1, 2)]
        gt = read_ground_truth(shards)[0]
        results = {
            t: json.loads((tmp / "out1" / f"{t}.json").read_text()) for t in ("bbox", "segm")
        }
        coco = time_coco_eval(gt, results, args.repeats)

    print(f"evaluation of {args.images} images at {cfg.input.min_size_test} px, "
          f"{os.cpu_count()} cores:")  # fmt: skip
    for run in runs:
        print(f"  {run['processes']} process(es) x {run['threads_per_process']} threads: "
              f"{run['images_per_s']:7.2f} images/s (inference {run['inference_seconds']:.1f} s,"
              f" wall {run['wall_seconds']:.1f} s with start-up)")  # fmt: skip
    print(
        f"  ratio 2 processes / 1 process: {runs[1]['images_per_s'] / runs[0]['images_per_s']:.2f}"
    )
    print(f"COCOeval bbox + segm on {coco['detections']} detections (median of {args.repeats}):")
    print(f"  pycocotools {coco['pycocotools_s']:.3f} s, faster-coco-eval {coco['faster_s']:.3f} s:"
          f" ratio (speed-up) {coco['speedup']:.1f}x; largest stat difference "
          f"{coco['max_stat_difference']:.1e}")  # fmt: skip
    print(json.dumps({"evaluation": runs, "coco_eval": coco}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
