"""Fake (meta) kernels and autograd formulas of the ``maskrcnn_ops`` operators.

Registered from Python with ``torch.library`` so that the ops work under ``torch.compile`` and
autograd. The backward ops are differentiable too (each is linear in its incoming gradient, so
its own gradient is the forward pooling), which makes double backward work.
"""

import torch
from torch.library import register_autograd, register_fake

_ops = torch.ops.maskrcnn_ops


# --- fake kernels -------------------------------------------------------------------------------


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
):
    return grad.new_empty((batch_size, channels, height, width))


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
):
    return [
        grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths, strict=True)
    ]


def _nms_fake(boxes, scores, *args):
    # Data-dependent length: the number of kept boxes.
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((num_kept,), dtype=torch.int64)


for _name in ("nms", "batched_nms", "nms_bitmask"):
    register_fake(f"maskrcnn_ops::{_name}", _nms_fake)


# --- autograd -----------------------------------------------------------------------------------


def _roi_align_setup(ctx, inputs, output):
    input, rois, *params = inputs
    ctx.save_for_backward(rois)
    ctx.params = params  # spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, mode
    ctx.input_shape = input.shape


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
    )
    return grad_input, None, None, None, None, None, None, None


def _roi_align_backward_setup(ctx, inputs, output):
    _, rois, scale, pooled_h, pooled_w, _, _, _, _, sampling_ratio, aligned, mode = inputs
    ctx.save_for_backward(rois)
    ctx.params = (scale, pooled_h, pooled_w, sampling_ratio, aligned, mode)


def _roi_align_backward_grad(ctx, grad_grad_input):
    (rois,) = ctx.saved_tensors
    grad_grad = _ops.roi_align(grad_grad_input, rois, *ctx.params)
    return (grad_grad,) + (None,) * 11


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
    )
    return list(grads), None, None, None, None, None, None, None, None


def _multilevel_backward_setup(ctx, inputs, output):
    _, rois, levels, scales, _, _, _, _, pooled_h, pooled_w, sampling_ratio, aligned, mode = inputs
    ctx.save_for_backward(rois, levels)
    ctx.params = (scales, pooled_h, pooled_w, sampling_ratio, aligned, mode)


def _multilevel_backward_grad(ctx, grad_grads):
    rois, levels = ctx.saved_tensors
    grad_grad = _ops.multilevel_roi_align(list(grad_grads), rois, levels, *ctx.params)
    return (grad_grad,) + (None,) * 12


register_autograd(
    "maskrcnn_ops::multilevel_roi_align", _multilevel_grad, setup_context=_multilevel_setup
)
register_autograd(
    "maskrcnn_ops::multilevel_roi_align_backward",
    _multilevel_backward_grad,
    setup_context=_multilevel_backward_setup,
)
