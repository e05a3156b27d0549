"""Synchronized BatchNorm that also runs on the CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so ``sync_bn`` could not be trained or tested
without GPUs. ``CpuSyncBatchNorm2d`` does what detectron2's NaiveSyncBatchNorm does: each rank
computes the per-channel mean and mean of squares of its batch, one differentiable all-reduce
averages them over the ranks, and the batch is normalized with the global statistics. The
gradient flows back through the all-reduce, so every rank's backward sees the whole global
batch, as with the CUDA kernel. The mean of per-rank means weights every rank alike; when
the ranks' padded batches differ in size this differs slightly from the pooled statistic
(detectron2 accepts the same approximation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are averaged over all ranks of the default group."""

    def forward(self, x: Tensor) -> Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, 2, 3]
        mean = x.mean(dim=dims, dtype=torch.float32)
        mean_sq = (x.float() * x.float()).mean(dim=dims)
        stats = dist_fn.all_reduce(torch.cat([mean, mean_sq]), op=dist.ReduceOp.SUM) / world
        mean, mean_sq = stats[:channels], stats[channels:]
        var = (mean_sq - mean * mean).clamp_(min=0.0)
        if self.track_running_stats:
            with torch.no_grad():
                count = x.numel() / channels * world
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), momentum)
                unbiased = var.detach() * (count / max(1.0, count - 1))
                self.running_var.lerp_(unbiased, momentum)
                self.num_batches_tracked.add_(1)
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd if self.affine else invstd
        shift = (self.bias if self.affine else 0.0) - mean * scale
        shape = (1, channels, 1, 1)
        return (x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d becomes synchronized: torch's CUDA kernel on GPUs, ours on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        synced = CpuSyncBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        synced.load_state_dict(module.state_dict())
        if module.affine:
            synced.weight.requires_grad_(module.weight.requires_grad)
            synced.bias.requires_grad_(module.bias.requires_grad)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


__all__ = ["CpuSyncBatchNorm2d", "convert_sync_batchnorm"]
