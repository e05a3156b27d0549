"""CPU benchmark of the native ops against torchvision, measured in the same run.

    python benchmarks/ops.py            # the full sizes below, median of --repeats runs
    python benchmarks/ops.py --quick    # small sizes, one run each: a smoke test

Ours and torchvision's calls alternate within each repeat so that both see the same machine load;
the ratio is torchvision's median time over ours (> 1: ours is faster). Both use 2 threads.
"""

import argparse
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

# This script is itself named ops.py and its directory leads sys.path: put the repository first so
# that `import ops` finds the package, not this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops

IMAGE_H, IMAGE_W = 800, 1088


def realistic_boxes(n: int, min_size: float = 16.0, max_size: float = 600.0) -> torch.Tensor:
    """[n, 4] boxes in image pixels, sizes log-uniform in [min_size, max_size], clipped."""
    size = torch.empty(n).uniform_(math.log(min_size), math.log(max_size)).exp()
    aspect = torch.empty(n).uniform_(-0.7, 0.7).exp().sqrt()
    w, h = size * aspect, size / aspect
    cx, cy = torch.rand(n) * IMAGE_W, torch.rand(n) * IMAGE_H
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, IMAGE_W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, IMAGE_H)
    return boxes


def rois_for(boxes_per_image: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i)), b], 1)
            for i, b in enumerate(boxes_per_image)
        ]
    )


class Case:
    def __init__(self, name: str, goal: float, ours: Callable, theirs: Callable, check: Callable):
        self.name, self.goal, self.ours, self.theirs, self.check = name, goal, ours, theirs, check


def build_cases(quick: bool) -> list[Case]:
    channels = 32 if quick else 256
    rois_per_image = 64 if quick else 512
    cases = []

    # FPN pooler: 2 images, P2-P5, 2 x 512 RoIs, 7x7, sampling 2, torchvision's aligned=False.
    features = [torch.randn(2, channels, IMAGE_H // s, IMAGE_W // s) for s in (4, 8, 16, 32)]
    boxes = [realistic_boxes(rois_per_image) for _ in range(2)]
    rois = rois_for(boxes)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    named = OrderedDict((str(i), f) for i, f in enumerate(features))
    cases.append(
        Case(
            "multilevel_roi_align fwd",
            3.0,
            lambda: ops.multilevel_roi_align(features, rois, 7, 2, aligned=False),
            lambda: pooler(named, boxes, [(IMAGE_H, IMAGE_W)] * 2),
            torch.equal,
        )
    )

    # RoIAlign on one stride-4 map: 1024 RoIs, 7x7, sampling 2.
    x = torch.randn(1, channels, IMAGE_H // 4, IMAGE_W // 4)
    single = rois_for([realistic_boxes(2 * rois_per_image)])
    cases.append(
        Case(
            "roi_align fwd",
            3.0,
            lambda: ops.roi_align(x, single, 7, 0.25, 2, aligned=False),
            lambda: torchvision.ops.roi_align(x, single, 7, 0.25, 2, aligned=False),
            torch.equal,
        )
    )
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = ops.roi_align(x_ours, single, 7, 0.25, 2, aligned=False)
    out_theirs = torchvision.ops.roi_align(x_theirs, single, 7, 0.25, 2, aligned=False)
    grad = torch.randn_like(out_ours)
    cases.append(
        Case(
            "roi_align bwd",
            3.0,
            lambda: torch.autograd.grad(out_ours, x_ours, grad, retain_graph=True)[0],
            lambda: torch.autograd.grad(out_theirs, x_theirs, grad, retain_graph=True)[0],
            lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6),
        )
    )

    n = 2000 if quick else 20_000
    nms_boxes, nms_scores = realistic_boxes(n), torch.rand(n)
    cases.append(
        Case(
            f"nms {n} boxes",
            2.0,
            lambda: ops.nms(nms_boxes, nms_scores, 0.7),
            lambda: torchvision.ops.nms(nms_boxes, nms_scores, 0.7),
            torch.equal,
        )
    )

    n = 4000
    b_boxes, b_scores, b_idxs = realistic_boxes(n), torch.rand(n), torch.randint(0, 80, (n,))
    cases.append(
        Case(
            f"batched_nms {n} boxes, 80 classes",
            1.0,
            lambda: ops.batched_nms(b_boxes, b_scores, b_idxs, 0.7),
            lambda: torchvision.ops.batched_nms(b_boxes, b_scores, b_idxs, 0.7),
            torch.equal,
        )
    )
    return cases


def measure(case: Case, repeats: int) -> tuple[float, float]:
    """Median seconds of ours and of torchvision's, calls alternating, after one warm-up each."""
    assert case.check(case.ours(), case.theirs()), f"{case.name}: results differ"
    ours, theirs = [], []
    for r in range(repeats):
        pair = [(case.ours, ours), (case.theirs, theirs)]
        for fn, times in pair if r % 2 == 0 else reversed(pair):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: smoke test")
    parser.add_argument("--repeats", type=int, default=7, help="runs per op (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    args = parser.parse_args()
    if not ops.HAS_CPU_KERNELS:
        print("ops: the compiled kernels are not built; nothing to benchmark", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    print(f"CPU, {torch.get_num_threads()} threads, median of {repeats} run(s), times in ms")
    print(f"{'op':<36}{'ours':>10}{'torchvision':>13}{'ratio':>9}{'goal':>7}")
    for case in build_cases(args.quick):
        ours, theirs = measure(case, repeats)
        ratio = theirs / ours
        met = "ok" if ratio >= case.goal else "MISSED"
        print(
            f"{case.name:<36}{ours * 1e3:>10.1f}{theirs * 1e3:>13.1f}{ratio:>8.2f}x"
            f"{case.goal:>6.0f}x {met if not args.quick else ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
