"""Where a Mask R-CNN step makes the host wait for the GPU: ours against torchvision's, counted
exactly on the CPU.

    python benchmarks/syncs.py [--quick] [--batches 2 8] [--top N] [--threads T]

On a GPU the host queues kernels and runs ahead, except where it needs a value the device has
not produced yet: each such point drains the queue. A step is counted by what it dispatches, so
no GPU is needed and the count is the same on every machine:

* aten syncs (a ``TorchDispatchMode`` sees every aten op of the step, backward included): the
  ops PyTorch tags ``data_dependent_output`` (``_local_scalar_dense``, which ``item()``,
  ``bool()``, ``int()``, ``float()`` and a tensor used as an index or slice bound call;
  ``equal``, ``allclose``) or ``dynamic_output_shape`` (``nonzero``, ``argwhere``,
  ``masked_select``, the ``unique`` family, ``bincount``, ...); indexing and ``index_put`` with
  a boolean mask, except a Python number put through one mask (``x[mask] = 0``: the number
  becomes a CPU tensor and ATen a ``masked_fill``); ``repeat_interleave`` without
  ``output_size``; ``one_hot`` without ``num_classes``.
* host-device copies (a ``TorchFunctionMode`` sees the Python calls): ``tolist()``, ``numpy()``,
  ``cpu()`` of a device tensor, and Python data or a host tensor copied to the device
  (``torch.tensor(x, device=d)``, ``.to(d)``): a copy without ``non_blocking`` synchronises the
  stream.
* host reads inside compiled ops, which no mode sees, counted per call from their source: our
  index-list CUDA NMS reads one length (``num_kept.item()``, ops/csrc/nms_cuda.cu; the model
  calls ``nms_keep_mask``, which reads nothing); our CUDA RoIAlign forward and backward read one
  flag only with ``MASKRCNN_OPS_SYNC_CHECKS=1`` (``check_roi_indices``, ops/csrc/op_checks.h; by
  default a device-side assert); torchvision's CUDA NMS copies its mask to the host and the kept
  indices back (csrc/ops/cuda/nms_kernel.cu).

A GPU run keeps the model, its inputs and what is computed from them on the device, but not
every tensor: one made without a device (``torch.tensor(image.shape[-2:])``) stays on the host,
and reading it costs nothing. The counter follows placement: a factory's result is a host tensor
unless its ``device`` came from a device tensor (``device=boxes.device``), ``cpu()`` makes one,
and an op on host tensors alone makes host tensors. "GPU waits" is the sum of the three kinds on
device tensors. Issue #26's count is the first kind by the op alone, as the issue measured it:
whatever the placement, and with ``x[mask] = 0`` (the tables list what it adds).
torchvision's ``batched_nms`` picks its algorithm by device (a loop over classes above 4,000
coordinates on the CPU, 100,000 on CUDA): the count takes the CUDA branch.

Each wait is attributed to the module running when it happened (forward hooks on every module;
in backward, the module whose forward made the autograd node) and to the innermost line of
pipeline/, ops/ or torchvision. Both models are benchmarks/model.py's: ResNet-50-FPN, frozen
BatchNorm, the same weights, a box classifier scaled to give 100 detections per image. Inputs:
seeded images of 512x512 with 3 objects each (``--quick``: 256x256, 2 images only). Training is
one forward and backward, inference one call in eval mode, after one uncounted inference call.
The output ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
import torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from benchmarks.model import shapes_sample, torchvision_model  # noqa: E402
from pipeline.modeling import MaskRCNN  # noqa: E402

aten = torch.ops.aten
DATA_DEPENDENT = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
INDEX_PUTS = {aten.index_put, aten.index_put_, aten._index_put_impl_}


def _pooled(args, out) -> int:  # the forward reads its flag unless it has nothing to pool
    return int(out.numel() > 0)


def _first_nonempty(args, out) -> int:  # the backward (grad) and NMS (boxes): unless empty
    return int(args[0].numel() > 0)


def _torchvision_nms(args, out) -> int:
    return 2 * _first_nonempty(args, out)


# Host reads inside compiled ops on CUDA: op -> (reads of one call, what reads). The CUDA
# poolers validate their RoIs' indices on the device (a device-side assert, no read) unless
# MASKRCNN_OPS_SYNC_CHECKS=1 turns on the precise check, which reads one flag per call
# (check_roi_indices, ops/csrc/op_checks.h). nms_keep_mask reads nothing (fixed-size output).
_CHECK, _KEPT = "check_roi_indices .item (MASKRCNN_OPS_SYNC_CHECKS=1)", "num_kept.item"
CPP_READS = {
    "maskrcnn_ops::nms": (_first_nonempty, _KEPT),
    "maskrcnn_ops::batched_nms": (_first_nonempty, _KEPT),
    "maskrcnn_ops::nms_bitmask": (_first_nonempty, _KEPT),
    "torchvision::nms": (_torchvision_nms, "mask to host, kept indices to device"),
}
if os.environ.get("MASKRCNN_OPS_SYNC_CHECKS") == "1":
    CPP_READS.update(
        {
            "maskrcnn_ops::roi_align": (_pooled, _CHECK),
            "maskrcnn_ops::multilevel_roi_align": (_pooled, _CHECK),
            "maskrcnn_ops::roi_align_backward": (_first_nonempty, _CHECK),
            "maskrcnn_ops::multilevel_roi_align_backward": (_first_nonempty, _CHECK),
        }
    )
# Where a wait is attributed: the innermost frame in one of these trees.
SOURCE_ROOTS = [
    (str(REPO / "pipeline") + "/", "pipeline/"),
    (str(REPO / "ops") + "/", "ops/"),
    (str(Path(torchvision.__file__).parent) + "/", "torchvision/"),
]

TORCH_ROOT = str(Path(torch.__file__).parent) + "/"


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def aten_sync(func, args, kwargs, is_host) -> tuple[bool, bool]:
    """Whether ``func`` is a sync by issue #26's rule, and whether on CUDA tensors it makes the
    host wait (``is_host``: whether a tensor would be on the host in a GPU run)."""
    packet = func._overloadpacket
    if packet is aten.index:  # tagged for its boolean form only
        listed = any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1]))
        return listed, listed
    if packet in INDEX_PUTS:
        indices = _tensors(args[1])
        masks = [t for t in indices if t.dtype in (torch.bool, torch.uint8)]
        value, accumulate = args[2], (args[3] if len(args) > 3 else kwargs.get("accumulate"))
        # ATen's canDispatchToMaskedFill: one mask, one value on the host, no accumulation.
        masked_fill = len(masks) == len(indices) == 1 and value.numel() == 1 and is_host(value)
        return bool(masks), bool(masks) and not (masked_fill and not accumulate)
    if packet is aten.repeat_interleave:
        listed = func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        return listed, listed
    if packet is aten.one_hot:
        listed = (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
        return listed, listed
    listed = any(tag in func.tags for tag in DATA_DEPENDENT)
    return listed, listed


class SyncCounter:
    """Counts the waits of the code run inside it (a context manager) for one model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): name or "(model)" for name, m in model.named_modules()}
        self.stack: list[str] = []
        self.counts: Counter = Counter()  # (kind, op, module, place) -> waits
        # Tensors a GPU run would keep on the host, by id (a WeakSet would compare tensors with
        # their elementwise ==); the weak reference tells a live entry from a reused id.
        self.host: dict[int, weakref.ref] = {}
        self.devices: dict[int, tuple[torch.device, bool]] = {}  # id -> (object, on host)
        self.python_value = 0  # inside x[i] = <Python number>

    # ---- placement ----

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self.host.get(id(tensor))
        return ref is not None and ref() is tensor

    def place(self, tensor: torch.Tensor, host: bool) -> None:
        if host:
            self.host[id(tensor)] = weakref.ref(tensor)
        else:
            self.host.pop(id(tensor), None)

    def device_on_host(self, device, default: bool) -> bool:
        """Whether ``device`` (an argument) names the host in a GPU run: a torch.device read
        from a tensor (``x.device``) stands for where that tensor lives."""
        if device is None:
            return default
        if isinstance(device, torch.device) and id(device) in self.devices:
            return self.devices[id(device)][1]
        return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"

    # ---- records ----

    def record(self, kind: str, op: str, waits: int = 1) -> None:
        module = self.stack[-1] if self.stack else None
        node = torch._C._current_autograd_node()
        line = self.source_line()
        if node is not None:  # backward: the module whose forward made this node
            module = f"{node.metadata.get('syncs.module', '?')} (backward)"
            op, line = f"{op} (backward)", line or f"autograd {node.name()}"
        self.counts[kind, op, module or "(outside modules)", line or "?"] += waits

    @staticmethod
    def source_line() -> str | None:
        frame, outside = sys._getframe(1), None
        while frame is not None:
            path = frame.f_code.co_filename
            for root, label in SOURCE_ROOTS:
                if path.startswith(root):
                    where = f"{label}{path[len(root) :]}:{frame.f_lineno}"
                    return f"{where} {frame.f_code.co_name}"
            if outside is None and not path.startswith((TORCH_ROOT, __file__)):
                outside = f"{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"
            frame = frame.f_back
        return outside  # code outside the models (a test's)

    def on_aten(self, func, args, kwargs, out) -> None:
        inputs = _tensors((args, kwargs))
        host = bool(inputs) and all(self.is_host(t) for t in inputs)
        # A Python number put into a CUDA tensor (x[mask] = 0) is made a CPU tensor
        # (THPVariable_setitem), so that index_put_ can be a masked_fill.
        if host or (self.python_value and func is aten.lift_fresh.default):
            for t in _tensors(out):
                self.place(t, True)
        name = func.name().split(".")[0]
        listed, waits = aten_sync(func, args, kwargs, self.is_host)
        if listed:  # "no wait": the rule counts it, a GPU run does not wait
            self.record("aten" if waits and not host else "no wait", name.replace("::", "."))
        if name in CPP_READS and not host:
            reads, what = CPP_READS[name]
            count = reads(args, out)
            if count:
                self.record("C++", f"{name.replace('::', '.')} [{what}]", count)

    def on_call(self, func, args, kwargs):
        """Runs a Python-level call; counts a copy between host and device; returns its result
        (a copy where the CPU returns the argument itself but a GPU run would copy)."""
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        name = getattr(func, "__name__", "")
        python_value = name == "__setitem__" and not isinstance(args[2], torch.Tensor)
        self.python_value += python_value
        try:
            out = func(*args, **kwargs)
        finally:
            self.python_value -= python_value
        if getattr(func, "__self__", None) is torch.Tensor.device and this is not None:
            self.devices[id(out)] = (out, self.is_host(this))  # the object stays alive
            return out
        if this is not None and name in ("tolist", "numpy", "__array__"):
            if not self.is_host(this):
                self.record("copy", f"Tensor.{name} (device to host)")
            return out
        if this is not None and name in ("cpu", "to", "new_tensor"):
            if name == "cpu":
                target = True
            elif name == "new_tensor":
                target = self.is_host(this)
                this = None  # the data is Python's, on the host
            else:
                target = self.to_target(args[1:], kwargs, self.is_host(this))
            return self.moved(out, this, target, f"Tensor.{name}", kwargs)
        if func in (torch.tensor, torch.as_tensor, torch.asarray):
            data, device = args[0], kwargs.get("device", args[2] if len(args) > 2 else None)
            source = data if isinstance(data, torch.Tensor) else None
            default = self.is_host(source) if source is not None else True
            target = self.device_on_host(device, default)
            return self.moved(out, source, target, f"torch.{name}", kwargs)
        if isinstance(out, torch.Tensor) and not _tensors((args, kwargs)):  # a factory
            self.place(out, self.device_on_host(kwargs.get("device"), True))
        return out

    def to_target(self, args, kwargs, current: bool) -> bool:
        """Where ``Tensor.to`` puts its result: on the host or not."""
        for arg in [*args, kwargs.get("device"), kwargs.get("other")]:
            if isinstance(arg, torch.Tensor):
                return self.is_host(arg)
            if isinstance(arg, (str, torch.device)):
                return self.device_on_host(arg, current)
            if isinstance(arg, int) and not isinstance(arg, bool):
                return False  # a CUDA device index
        return current

    def moved(self, out, source, host: bool, what: str, kwargs):
        """``out``, placed on the host or not, after a copy from ``source`` (None: Python data);
        counts the copy when it crosses between host and device."""
        from_host = True if source is None else self.is_host(source)
        if from_host != host and not kwargs.get("non_blocking", False):
            self.record("copy", f"{what} ({'device to host' if host else 'host to device'})")
        if out is source and from_host != host:
            out = out.clone()  # a GPU run gets a copy; the source keeps its place
        self.place(out, host)
        return out

    # ---- modes and hooks ----

    @contextlib.contextmanager
    def __call__(self):
        def enter(module, _args):
            if id(module) in self.names:
                self.stack.append(self.names[id(module)])

        def leave(module, _args, _out):
            if id(module) in self.names and self.stack:
                self.stack.pop()

        hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(enter),
            torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
        ]
        try:
            with _Calls(self), _Aten(self), cuda_branches():
                yield self
        finally:
            for hook in hooks:
                hook.remove()
            self.devices.clear()


class _Aten(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.on_aten(func, args, kwargs, out)
        return out


class _Calls(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = self.counter.on_call(func, args, kwargs or {})
        if self.counter.stack:  # name the module on the autograd nodes, for backward
            for t in _tensors(out):
                if t.grad_fn is not None:
                    t.grad_fn.metadata.setdefault("syncs.module", self.counter.stack[-1])
        return out


@contextlib.contextmanager
def cuda_branches():
    """torchvision's batched_nms as on CUDA (the loop over classes above 100,000 coordinates,
    not 4,000): the count is a GPU run's."""
    from torchvision.ops import boxes as box_ops

    original = box_ops.batched_nms

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() > 100_000:
            return box_ops._batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
        return box_ops._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)

    box_ops.batched_nms = batched_nms
    try:
        yield
    finally:
        box_ops.batched_nms = original


# ---- the benchmark ----


def build_models(size: int) -> dict[str, torch.nn.Module]:
    max_size = size * 1333 // 800  # torchvision's ratio; square images keep their size
    reference = torchvision_model(size, max_size)
    ours = MaskRCNN.from_torchvision(
        reference.state_dict(),
        min_size_train=[size],
        max_size_train=max_size,
        min_size_test=size,
        max_size_test=max_size,
    )
    return {"ours": ours, "torchvision": reference}


def count(model, mode: str, images, targets) -> Counter:
    counter = SyncCounter(model)
    torch.manual_seed(0)  # the samplers' draws
    if mode == "training":
        model.train()
        with counter():
            losses = model(images, targets)
            sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad(), counter():
            model(images)
    return counter.counts


def figures(counts: Counter) -> dict:
    by_kind = Counter()
    for (kind, *_), n in counts.items():
        by_kind[kind] += n

    def by(index: int, kinds) -> dict[str, int]:
        total = Counter()
        for key, n in counts.items():
            if key[0] in kinds:
                total[key[index] if index >= 0 else f"{key[2]} | {key[3]}"] += n
        return dict(total.most_common())

    waits = ("aten", "copy", "C++")
    return {
        "gpu_waits": sum(by_kind[kind] for kind in waits),
        "aten_syncs": by_kind["aten"],
        "copies": by_kind["copy"],
        "cpp_reads": by_kind["C++"],
        "issue_count": by_kind["aten"] + by_kind["no wait"],
        "by_op": by(1, waits),
        "by_module": by(2, waits),
        "by_line": by(-1, waits),
        # What the rule counts but a GPU run does not wait for: reads of host tensors
        # and x[mask] = <number> (a masked_fill).
        "no_wait_by_line": by(-1, ("no wait",)),
    }


def print_table(title: str, fig: dict, top: int) -> None:
    print(
        f"\n{title}: {fig['gpu_waits']} GPU waits = {fig['aten_syncs']} aten syncs + "
        f"{fig['copies']} host-device copies + {fig['cpp_reads']} C++ reads; issue #26's "
        f"count {fig['issue_count']} aten syncs"
    )
    tables = [
        ("waits by op", "by_op"),
        ("waits by module", "by_module"),
        ("waits by module | line", "by_line"),
        ("issue's syncs that do not wait on a GPU, by module | line", "no_wait_by_line"),
    ]
    for label, key in tables:
        rows = list(fig[key].items())
        if not rows:
            continue
        print(f"  {'count':>6}  {label}")
        for name, n in rows[:top]:
            print(f"  {n:6d}  {name}")
        if len(rows) > top:
            print(f"  {sum(n for _, n in rows[top:]):6d}  ({len(rows) - top} more)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256x256 images, 2 a batch")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 256 if args.quick else 512
    batches = args.batches or ([2] if args.quick else [2, 8])

    models = build_models(size)
    generator = torch.Generator().manual_seed(0)
    samples = [shapes_sample(size, size, 3, generator) for _ in range(max(batches))]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {size}x{size}")
    for model in models.values():  # one uncounted call: first-call set-up is not a step's
        with torch.no_grad():
            model.eval()([image for image, _ in samples[:2]])

    results = {}
    for batch in batches:
        images = [image for image, _ in samples[:batch]]
        targets = [target for _, target in samples[:batch]]
        for mode in ("training", "inference"):
            for name, model in models.items():
                key = f"{name}, {mode}, {batch} images"
                results[key] = figures(count(model, mode, images, targets))
                print_table(f"{key} of {size}x{size}", results[key], args.top)

    print("\nsummary: GPU waits per step = aten syncs + host-device copies + C++ reads")
    header = f"  {'model, mode, batch':34s} {'GPU':>6} {'aten':>6} {'copy':>6} {'C++':>6}"
    print(header + f" {'issue':>6}")
    for key, fig in results.items():
        print(
            f"  {key:34s} {fig['gpu_waits']:6d} {fig['aten_syncs']:6d} {fig['copies']:6d} "
            f"{fig['cpp_reads']:6d} {fig['issue_count']:6d}"
        )
    print(json.dumps({"image_size": size, "configurations": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
