"""Benchmark of the native ops against torchvision (CPU; CUDA with --device cuda), same run.

    python benchmarks/ops.py            # the full sizes below, median of --repeats runs
    python benchmarks/ops.py --quick    # small sizes, one run each: a smoke test

Every case runs twice, on 1 thread and on --threads threads (default: all of torch's), and each
ratio is torchvision's median time over ours at that thread count (> 1: ours is faster):

* 1 thread: torchvision's CPU kernels are serial, so this is the fair per-core comparison. It is
  timed as the calling thread's CPU time (time.thread_time), which the load of other processes on
  a shared machine does not inflate. The goals apply to this ratio.
* N threads: wall time, what a caller with N intra-op threads waits.

Ours and torchvision's calls alternate within each repeat so that both see the same machine load.
Each case's name says what it compares, e.g. our pooler on channels-last P2-P5 against
torchvision's MultiScaleRoIAlign on the same tensors (which copies each level to NCHW).

    python benchmarks/ops.py --device cuda   # the same cases on the GPU, against torchvision's CUDA

On CUDA the tensors are made on the GPU and each call is timed in wall time between two
synchronizations; there is no thread count, and the CPU goals do not apply (none is judged). A
result that differs from torchvision's is reported in the row rather than stopping the run: the
two CUDA kernels need not round alike.
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
    image_sizes = [(IMAGE_H, IMAGE_W)] * 2

    def named(levels):
        return OrderedDict((str(i), f) for i, f in enumerate(levels))

    cases.append(
        Case(
            "pooler fwd NCHW vs MultiScaleRoIAlign",
            3.0,
            lambda: ops.multilevel_roi_align(features, rois, 7, 2, aligned=False),
            lambda: pooler(named(features), boxes, image_sizes),
            torch.equal,
        )
    )
    # A channels_last model's P2-P5: ours reads them in place, torchvision copies them to NCHW.
    nhwc = [f.contiguous(memory_format=torch.channels_last) for f in features]
    cases.append(
        Case(
            "pooler fwd channels_last vs MultiScaleRoIAlign",
            3.0,
            lambda: ops.multilevel_roi_align(nhwc, rois, 7, 2, aligned=False),
            lambda: pooler(named(nhwc), boxes, image_sizes),
            torch.equal,
        )
    )
    # Each in the layout it runs fastest in: ours reads channels-last maps (what our model gives
    # it), torchvision's kernels NCHW ones (what its model gives them).
    cases.append(
        Case(
            "pooler fwd best layouts: ours NHWC, theirs NCHW",
            3.0,
            lambda: ops.multilevel_roi_align(nhwc, rois, 7, 2, aligned=False),
            lambda: pooler(named(features), boxes, image_sizes),
            torch.equal,
        )
    )
    leaves_ours = [f.detach().clone().requires_grad_() for f in nhwc]
    leaves_theirs = [f.detach().clone().requires_grad_() for f in nhwc]
    pooled_grad = torch.randn(rois.shape[0], channels, 7, 7)

    def pool_fwd_bwd(pool, leaves):
        return torch.autograd.grad(pool(leaves), leaves, pooled_grad)

    cases.append(
        Case(
            "pooler fwd+bwd channels_last vs MultiScale",
            2.0,
            lambda: pool_fwd_bwd(
                lambda f: ops.multilevel_roi_align(f, rois, 7, 2, aligned=False), leaves_ours
            ),
            lambda: pool_fwd_bwd(lambda f: pooler(named(f), boxes, image_sizes), leaves_theirs),
            lambda a, b: all(
                torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(a, b, strict=True)
            ),
        )
    )

    # RoIAlign on one stride-4 map: 1024 RoIs, 7x7, sampling 2.
    x = torch.randn(1, channels, IMAGE_H // 4, IMAGE_W // 4)
    single = rois_for([realistic_boxes(2 * rois_per_image)])
    cases.append(
        Case(
            "roi_align fwd NCHW vs roi_align",
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
            "roi_align bwd NCHW vs roi_align",
            3.0,
            lambda: torch.autograd.grad(out_ours, x_ours, grad, retain_graph=True)[0],
            lambda: torch.autograd.grad(out_theirs, x_theirs, grad, retain_graph=True)[0],
            lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6),
        )
    )
    # float16 maps. torchvision's CPU kernel takes them with float16 RoIs and computes in float16;
    # ours computes in float32 and takes the RoIs in float32 (as autocast leaves them). The check:
    # ours is at least as close as torchvision's to float32 pooling of the same float16 values.
    x_half = x.half()
    exact = ops.roi_align(x_half.float(), single, 7, 0.25, 2, aligned=False)

    def no_less_accurate(a, b):
        return (a.float() - exact).abs().max() <= (b.float() - exact).abs().max()

    cases.append(
        Case(
            "roi_align fwd float16 vs roi_align",
            1.0,
            lambda: ops.roi_align(x_half, single, 7, 0.25, 2, aligned=False),
            lambda: torchvision.ops.roi_align(x_half, single.half(), 7, 0.25, 2, aligned=False),
            no_less_accurate,
        )
    )

    n = 2000 if quick else 20_000
    nms_boxes, nms_scores = realistic_boxes(n), torch.rand(n)
    cases.append(
        Case(
            f"nms {n} boxes vs nms",
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
            f"batched_nms {n} boxes 80 classes vs same",
            1.0,
            lambda: ops.batched_nms(b_boxes, b_scores, b_idxs, 0.7),
            lambda: torchvision.ops.batched_nms(b_boxes, b_scores, b_idxs, 0.7),
            torch.equal,
        )
    )
    return cases


def measure(case: Case, repeats: int, threads: int) -> tuple[float, float]:
    """Median seconds of ours and of torchvision's on `threads` threads, calls alternating, after
    one warm-up each: the thread's CPU time on one thread, wall time on several."""
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    assert case.check(case.ours(), case.theirs()), f"{case.name}: results differ"
    ours, theirs = [], []
    for r in range(repeats):
        pair = [(case.ours, ours), (case.theirs, theirs)]
        for fn, times in pair if r % 2 == 0 else reversed(pair):
            start = clock()
            fn()
            times.append(clock() - start)
    return statistics.median(ours), statistics.median(theirs)


def measure_synced(
    case: Case, repeats: int, synchronize: Callable[[], None]
) -> tuple[float, float, bool]:
    """(median seconds of ours, of torchvision's, whether their results agree): wall time between
    two synchronize() calls, so that the asynchronous kernels are counted whole."""
    agree = bool(case.check(case.ours(), case.theirs()))  # also the warm-up
    ours, theirs = [], []
    for r in range(repeats):
        pair = [(case.ours, ours), (case.theirs, theirs)]
        for fn, times in pair if r % 2 == 0 else reversed(pair):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs), agree


def main_cuda(quick: bool, repeats: int) -> int:
    if not torch.cuda.is_available() or not ops.HAS_CUDA_KERNELS:
        print("ops: no CUDA device or CUDA kernels; nothing to benchmark", file=sys.stderr)
        return 1
    # The cases' factories (torch.randn, torch.full, ...) make their tensors on the GPU.
    with torch.device("cuda"):
        cases = build_cases(quick)
    print(f"CUDA ({torch.cuda.get_device_name()}), median of {repeats} run(s), wall time in ms.")
    print("ratio = torchvision's time / ours (> 1: ours faster).")
    print(f"{'op':<46}{'ours':>9}{'torchvision':>12}{'ratio':>9}  result")
    for case in cases:
        ours, theirs, agree = measure_synced(case, repeats, torch.cuda.synchronize)
        row = f"{case.name:<46}{ours * 1e3:>9.2f}{theirs * 1e3:>12.2f}{theirs / ours:>8.2f}x"
        print(f"{row}  {'same' if agree else 'DIFFERS'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: smoke test")
    parser.add_argument("--repeats", type=int, default=7, help="runs per op (default 7)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads of the N-thread run"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the ops run (default cpu)"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        torch.manual_seed(0)
        return main_cuda(args.quick, 1 if args.quick else args.repeats)
    if not ops.HAS_CPU_KERNELS:
        print("ops: the compiled kernels are not built; nothing to benchmark", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    n = args.threads
    print(f"CPU, median of {repeats} run(s), times in ms. ratio = torchvision's time / ours at the")
    print("same thread count (> 1: ours faster); the goal applies to the 1-thread ratio.")
    print(f"{'':<46}{'--- 1 thread (CPU time) ---':>30}{f'--- {n} threads (wall time) ---':>32}")
    header = f"{'ours':>9}{'torchvision':>12}{'ratio':>9}"
    print(f"{'op':<46}{header}  {header}{'goal':>7}")
    for case in build_cases(args.quick):
        row = f"{case.name:<46}"
        ratios = []
        for threads in (1, n):
            ours, theirs = measure(case, repeats, threads)
            ratios.append(theirs / ours)
            row += f"{ours * 1e3:>9.1f}{theirs * 1e3:>12.1f}{ratios[-1]:>8.2f}x  "
        met = "ok" if ratios[0] >= case.goal else "MISSED"
        print(f"{row}{case.goal:>4.0f}x {met if not args.quick else ''}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
