"""Convolutions whose channels-last weight gradient is computed in NCHW on the CPU.

oneDNN's CPU kernel for the weight gradient of a channels-last convolution with a spatial kernel
is several times slower than its NCHW kernel on CPUs without AVX-512 (measured with torch 2.14
on a 2-core AMD EPYC, 2 threads, batch 2: a 3x3 256->256 convolution on a 200x272 map, FPN's
P2, takes 6.1 s for the channels-last weight gradient against 1.2 s in NCHW, while its forward
and input gradient are 10-20% faster in channels-last). ``conv2d`` keeps the forward and the
input gradient in channels-last and computes only the weight gradient from NCHW copies of the
input and of the output gradient. The gap grows with the map: the copies cost more than they
save below about 3000 pixels or 128 channels (measured, 3x3 C->C forward and backward, 1 and 2
threads: 2.3x faster at 256 channels on 200x272, 1.24-1.59x at 128 on 100x136, 1.08x at 256 on
50x68, 0.97-1.08x at 512 on 25x34, 0.8-1.0x at 64 channels on 32x32 or 64x64), so smaller
convolutions, 1x1 ones (channels-last is faster in every direction), GPUs and autocast regions
run ``F.conv2d`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHANNELS_LAST = torch.channels_last
MIN_PIXELS = 3000  # per image, H x W of the input
MIN_CHANNELS = 128  # of the input


def _reroutes(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[1] >= MIN_CHANNELS
        and x.shape[2] * x.shape[3] >= MIN_PIXELS
        and weight.requires_grad
        and torch.is_grad_enabled()
        and weight.shape[-2:] != (1, 1)
        and x.is_contiguous(memory_format=_CHANNELS_LAST)
        and not x.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
    )


class _ConvNCHWWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None

        bias_sizes = [weight.shape[0]] if ctx.has_bias else None

        def conv_backward(g, inp, w, mask):
            return torch.ops.aten.convolution_backward(
                g, inp, w, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
            )

        if need_x:
            g = grad_out.contiguous(memory_format=_CHANNELS_LAST)
            grad_x = conv_backward(g, x, weight, [True, False, False])[0]
        if need_w or need_b:  # need_b is False without a bias
            _, grad_w, grad_b = conv_backward(
                grad_out.contiguous(), x.contiguous(), weight.contiguous(), [False, need_w, need_b]
            )
            if grad_w is not None and weight.is_contiguous(memory_format=_CHANNELS_LAST):
                grad_w = grad_w.contiguous(memory_format=_CHANNELS_LAST)  # as the parameter
        return grad_x, grad_w, grad_b, None, None, None, None


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d``; on the CPU, a channels-last input's weight gradient comes from NCHW."""
    if not _reroutes(x, weight) or isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _ConvNCHWWeightGrad.apply(
        x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups
    )


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) computing with ``conv2d`` above."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
