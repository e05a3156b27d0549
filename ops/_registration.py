"""Fake (meta) kernels and autograd formulas of the ``maskrcnn_ops`` operators.

Registered from Python with ``torch.library`` so that the ops work under ``torch.compile`` and
autograd. The backward ops are differentiable too (each is linear in its incoming gradient, so
its own gradient is the forward pooling), which makes double backward work. The autocast rules
are C++ (ops/csrc/autocast.cpp).

The pooled outputs are contiguous [K, C, PH, PW]; the input gradients are channels-last when the
features were (``channels_last`` argument of the backward ops), so a channels-last model gets its
gradients in its own layout.
"""

import torch
from torch.library import register_autograd, register_fake

_ops = torch.ops.maskrcnn_ops


# --- fake kernels -------------------------------------------------------------------------------


def _empty_grad(grad, shape, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format)


def is_channels_last(tensor) -> bool:
    """Whether the kernels read ``tensor`` as channels-last: NHWC-dense and not also contiguous
    (which one channel or a 1x1 map would be). ops/csrc/op_checks.h has the same rule."""
    return (
        tensor.dim() == 4
        and tensor.is_contiguous(memory_format=torch.channels_last)
        and not tensor.is_contiguous()
    )


@register_fake("maskrcnn_ops::roi_align")
def _roi_align_fake(
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode
):
    torch._check(input.dim() == 4, lambda: "input must be [N, C, H, W]")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "rois must have shape [K, 5]")
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@register_fake("maskrcnn_ops::roi_align_backward")
def _roi_align_backward_fake(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
    aligned,
    mode,
    channels_last=False,
):
    return _empty_grad(grad, (batch_size, channels, height, width), channels_last)


@register_fake("maskrcnn_ops::multilevel_roi_align")
def _multilevel_fake(
    features,
    rois,
    levels,
    spatial_scales,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    mode,
):
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "rois must have shape [K, 5]")
    first = features[0]
    return first.new_empty((rois.shape[0], first.shape[1], pooled_height, pooled_width))


@register_fake("maskrcnn_ops::multilevel_roi_align_backward")
def _multilevel_backward_fake(
    grad,
    rois,
    levels,
    spatial_scales,
    heights,
    widths,
    batch_size,
    channels,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    mode,
    channels_last=False,
):
    return [
        _empty_grad(grad, (batch_size, channels, h, w), channels_last)
        for h, w in zip(heights, widths, strict=True)
    ]


def _nms_fake(boxes, scores, *args):
    # Data-dependent length: the number of kept boxes.
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((num_kept,), dtype=torch.int64)


for _name in ("nms", "batched_nms", "nms_bitmask"):
    register_fake(f"maskrcnn_ops::{_name}", _nms_fake)


@register_fake("maskrcnn_ops::nms_keep_mask")
def _nms_keep_mask_fake(boxes, scores, iou_threshold, idxs=None):
    # Fixed size: one flag per box.
    return boxes.new_empty((boxes.shape[0],), dtype=torch.bool)


# --- autograd -----------------------------------------------------------------------------------


def _roi_align_setup(ctx, inputs, output):
    input, rois, *params = inputs
    ctx.save_for_backward(rois)
    ctx.params = params  # spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode
    ctx.input_shape = input.shape
    ctx.channels_last = is_channels_last(input)


def _roi_align_grad(ctx, grad):
    (rois,) = ctx.saved_tensors
    scale, pooled_h, pooled_w, sampling_ratio, aligned, mode = ctx.params
    batch, channels, height, width = ctx.input_shape
    grad_input = _ops.roi_align_backward(
        grad,
        rois,
        scale,
        pooled_h,
        pooled_w,
        batch,
        channels,
        height,
        width,
        sampling_ratio,
        aligned,
        mode,
        ctx.channels_last,
    )
    return grad_input, None, None, None, None, None, None, None


def _roi_align_backward_setup(ctx, inputs, output):
    _, rois, scale, pooled_h, pooled_w, _, _, _, _, sampling_ratio, aligned, mode, _ = inputs
    ctx.save_for_backward(rois)
    ctx.params = (scale, pooled_h, pooled_w, sampling_ratio, aligned, mode)


def _roi_align_backward_grad(ctx, grad_grad_input):
    (rois,) = ctx.saved_tensors
    grad_grad = _ops.roi_align(grad_grad_input, rois, *ctx.params)
    return (grad_grad,) + (None,) * 12


register_autograd("maskrcnn_ops::roi_align", _roi_align_grad, setup_context=_roi_align_setup)
register_autograd(
    "maskrcnn_ops::roi_align_backward",
    _roi_align_backward_grad,
    setup_context=_roi_align_backward_setup,
)


def _multilevel_setup(ctx, inputs, output):
    features, rois, levels, *params = inputs
    ctx.save_for_backward(rois, levels)
    ctx.params = params  # spatial_scales, pooled_h, pooled_w, sampling_ratio, aligned, mode
    ctx.level_sizes = [(f.shape[2], f.shape[3]) for f in features]
    ctx.batch_channels = (features[0].shape[0], features[0].shape[1])
    ctx.channels_last = all(is_channels_last(f) for f in features)


def _multilevel_grad(ctx, grad):
    rois, levels = ctx.saved_tensors
    scales, pooled_h, pooled_w, sampling_ratio, aligned, mode = ctx.params
    heights = [h for h, _ in ctx.level_sizes]
    widths = [w for _, w in ctx.level_sizes]
    batch, channels = ctx.batch_channels
    grads = _ops.multilevel_roi_align_backward(
        grad,
        rois,
        levels,
        scales,
        heights,
        widths,
        batch,
        channels,
        pooled_h,
        pooled_w,
        sampling_ratio,
        aligned,
        mode,
        ctx.channels_last,
    )
    return list(grads), None, None, None, None, None, None, None, None


def _multilevel_backward_setup(ctx, inputs, output):
    _, rois, levels, scales, _, _, _, _, pooled_h, pooled_w, sampling_ratio, aligned, mode, _ = (
        inputs
    )
    ctx.save_for_backward(rois, levels)
    ctx.params = (scales, pooled_h, pooled_w, sampling_ratio, aligned, mode)


def _multilevel_backward_grad(ctx, grad_grads):
    rois, levels = ctx.saved_tensors
    grad_grad = _ops.multilevel_roi_align(list(grad_grads), rois, levels, *ctx.params)
    return (grad_grad,) + (None,) * 13


register_autograd(
    "maskrcnn_ops::multilevel_roi_align", _multilevel_grad, setup_context=_multilevel_setup
)
register_autograd(
    "maskrcnn_ops::multilevel_roi_align_backward",
    _multilevel_backward_grad,
    setup_context=_multilevel_backward_setup,
)
