"""Synchronized BatchNorm that also runs on the CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so ``sync_bn`` could not be trained or tested
without GPUs. ``CpuSyncBatchNorm2d`` computes what torch's CUDA kernel computes, with an
autograd function of its own (as ``SyncBatchNorm`` has):

* forward: each rank's pixel count, per-channel mean and variance (computed around its own
  mean, so no float32 cancellation) go into one all-reduce of count-weighted sums, in
  float64; the batch is normalized with the mean and variance of every pixel of the global
  batch, however many images, and of whatever padded size, each rank holds;
* backward: one all-reduce of the per-channel sums of ``dy`` and ``dy * (x - mean)``, so
  each rank's input gradient is that of the global batch; the weight and bias gradients
  stay per rank, for DDP to average like every other parameter's.

Both are plain ``torch.distributed`` all-reduces of 2C+1 and 2C values on the default group
(CPU tensors: gloo, also in a ``cuda:nccl,cpu:gloo`` group), made by every rank at the same
point of its forward and backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

_DIMS = (0, 2, 3)  # all but the channel dimension


def _per_channel(values: Tensor) -> Tensor:
    return values.reshape(1, -1, 1, 1)


class _SyncBatchNorm(torch.autograd.Function):
    """Batch normalization over the pixels of all ranks' inputs together (training mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        channels = x.shape[1]
        xf = x.float()
        count = x.numel() // channels
        if count:
            var, mean = torch.var_mean(xf, dim=_DIMS, correction=0)
        else:  # a rank without pixels adds nothing
            var = mean = xf.new_zeros(channels)
        # sums of n, n * mean and n * (var + mean^2) over the ranks; float64 keeps
        # E[x^2] - E[x]^2 exact enough once the ranks' moments are combined.
        mean64, var64 = mean.double(), var.double()
        local = torch.cat([mean64.new_tensor([count]), count * mean64, count * (var64 + mean64**2)])
        dist.all_reduce(local)
        total = float(local[0])
        if total <= 1:  # BatchNorm2d refuses this too: no variance in one value
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(total)} "
                "over all ranks"
            )
        global_mean = local[1 : channels + 1] / total
        global_var = (local[channels + 1 :] / total - global_mean**2).clamp_(min=0.0)
        if running_mean is not None:
            unbiased = global_var * (total / (total - 1))
            running_mean.lerp_(global_mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
        mean, invstd = global_mean.float(), torch.rsqrt(global_var.float() + eps)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total = total
        return (xf * _per_channel(scale) + _per_channel(shift)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = grad_out.float()
        xmu = x.float() - _per_channel(mean)
        sum_dy = dy.sum(dim=_DIMS)
        sum_dy_xmu = (dy * xmu).sum(dim=_DIMS)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # the same on every rank: the graph is the same
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)
            channels = x.shape[1]
            mean_dy = sums[:channels] / ctx.total
            mean_dy_xmu = sums[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (
                (dy - _per_channel(mean_dy) - xmu * _per_channel(invstd**2 * mean_dy_xmu))
                * _per_channel(scale)
            ).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(grad_out.dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of all ranks' batches together."""

    def forward(self, x: Tensor) -> Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as BatchNorm2d keeps it
                momentum = 1.0 / float(self.num_batches_tracked)
        return _SyncBatchNorm.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            momentum,
        )


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
