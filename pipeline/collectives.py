"""The small cross-rank helpers of the train and eval stages, in one place.

Every collective that the pipeline makes outside the strategies (DDP and DeepSpeed reduce
gradients themselves) and the synchronized BatchNorm goes through here, so that each one
is written once for the backends it meets:

* ``gloo`` on CPU-only machines;
* ``cuda:nccl,cpu:gloo`` on GPUs (``pipeline.distributed.resolve_backend``): CPU tensors and
  Python objects go to gloo, CUDA tensors to NCCL;
* ``nccl`` alone, when ``distributed.backend=nccl`` is forced: NCCL has no CPU backend, so
  the tensor helpers carry their values on the current CUDA device instead.

Without a process group (one process) each helper returns its input. Every rank must call
the same helper at the same point, like any collective.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _tensor_device(group=None) -> torch.device:
    """Where a collective's small tensor must live for ``group``'s backend."""
    backend = str(dist.get_backend(group))
    serves_cpu = "cpu:" in backend or backend in ("gloo", "mpi", "ucc")
    if serves_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks, in float64 (one all-reduce)."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_across_ranks(value: float) -> float:
    """``value`` averaged over the ranks."""
    return sum_across_ranks([value])[0] / world_size()


def _device_tensor_place(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` runs: in place on its CUDA device when NCCL serves it
    (queued like a kernel, so the host does not wait), else where :func:`_tensor_device`
    says."""
    if tensor.device.type == "cuda" and "nccl" in str(dist.get_backend()):
        return tensor.device
    return _tensor_device()


def _to_collective_place(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``tensor`` in ``dtype`` where its collective runs. Non-blocking only on the
    same device: a CUDA tensor copied to the CPU for gloo must have arrived before gloo reads
    it, so that copy waits (a CUDA run under gloo pays that read; NCCL runs do not)."""
    place = _device_tensor_place(tensor)
    same = place == tensor.device
    return tensor.to(place, dtype, non_blocking=same, copy=True)


def mean_tensor_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` (a tensor) averaged over the ranks, as a tensor on its device: no host read."""
    if world_size() == 1:
        return value
    tensor = _to_collective_place(value, torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world_size()).to(value.device, value.dtype, non_blocking=True)


def any_rank_tensor(flag: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a boolean tensor over the ranks, as a boolean tensor on its device
    (one tiny all-reduce; the caller reads it when it must)."""
    if world_size() == 1:
        return flag
    tensor = _to_collective_place(flag, torch.float32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.to(flag.device, non_blocking=True) > 0


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one tiny all-reduce)."""
    if world_size() == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=_tensor_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on ``dst``; None elsewhere."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``src``'s ``obj`` on every rank of ``group`` (the default group when None)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier() -> None:
    """Wait until every rank arrives."""
    if world_size() > 1:
        dist.barrier()


def patient_cpu_group(timeout: timedelta = timedelta(days=7)):
    """A gloo group over all ranks with a long timeout, for handshakes where ranks may wait
    far longer than the default group's timeout (ranks idle while rank 0 scores and uploads
    an evaluation): under NCCL such a wait would trip the watchdog and abort the job. None
    without a process group. Every rank must call this at the same point."""
    if world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


__all__ = [
    "all_gather_objects",
    "any_rank",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "mean_across_ranks",
    "patient_cpu_group",
    "sum_across_ranks",
    "world_size",
]
