"""Mixed precision: the ops under autocast, and their float16/bfloat16 kernels, against float32."""

import pytest
import torch
from ops_cases import random_boxes, to_rois
from torch.testing import assert_close

import ops
from ops.fpn_levels import map_rois_to_levels

OPS = torch.ops.maskrcnn_ops
REDUCED = [torch.float16, torch.bfloat16]
# One bfloat16 rounding of the inputs and one of the output, on values of a few units.
BF16_TOLERANCE = {"rtol": 1e-2, "atol": 2e-2}


def pyramid(device, channels=4, dtype=torch.float32):
    return [torch.randn(2, channels, 64 // s, 80 // s, dtype=dtype, device=device) for s in (4, 8)]


def pyramid_rois(device, n=30):
    return to_rois(random_boxes(n, 64, 80, 2, 120), 2).to(device)


def single_case(device):
    x = torch.randn(2, 5, 12, 15, device=device)
    rois = to_rois(random_boxes(20, 24, 30, 1, 40), 2).to(device)
    return x, rois


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def assert_rounded_once(out, exact):
    """`out` is the float32 result `exact` rounded once to out's dtype: bit for bit on the CPU,
    whose float32 loops are the same code for every storage type; within a rounding on CUDA,
    where the compiler may contract each kernel instantiation's multiply-adds differently."""
    if out.device.type == "cpu":
        assert torch.equal(out, exact.to(out.dtype))
    else:
        assert_close(out, exact.to(out.dtype))


# --- autocast: bf16 features, float32 RoIs ------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_roi_align_under_autocast(device, channels_last, mode):
    x, rois = single_case(device)
    features = x.to(torch.bfloat16)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    features.requires_grad_()
    with autocast(device):
        out = ops.roi_align(features, rois, 3, 0.5, 2, mode=mode)
    assert out.dtype == torch.bfloat16 and rois.dtype == torch.float32
    # The op ran in float32 on the rounded features and rounded its output once ...
    expected = ops.roi_align(features.detach().float(), rois, 3, 0.5, 2, mode=mode)
    assert_rounded_once(out, expected)
    # ... so it is the float32 result up to bfloat16 rounding.
    assert_close(out.float(), ops.roi_align(x, rois, 3, 0.5, 2, mode=mode), **BF16_TOLERANCE)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert features.grad.dtype == torch.bfloat16
    x32 = x.clone().requires_grad_()
    ops.roi_align(x32, rois, 3, 0.5, 2, mode=mode).backward(grad.float())
    assert_close(features.grad.float(), x32.grad, **BF16_TOLERANCE)


@pytest.mark.parametrize("channels_last", [False, True])
def test_multilevel_roi_align_under_autocast(device, channels_last):
    levels32 = pyramid(device)
    rois = pyramid_rois(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    features = [
        f.to(torch.bfloat16, memory_format=memory_format).requires_grad_() for f in levels32
    ]
    with autocast(device):
        out = ops.multilevel_roi_align(features, rois, 4, 2, canonical_size=32, canonical_level=3)
    assert out.dtype == torch.bfloat16
    expected = ops.multilevel_roi_align(
        [f.detach().float() for f in features], rois, 4, 2, canonical_size=32, canonical_level=3
    )
    assert_rounded_once(out, expected)
    reference32 = ops.multilevel_roi_align(
        levels32, rois, 4, 2, canonical_size=32, canonical_level=3
    )
    assert_close(out.float(), reference32, **BF16_TOLERANCE)
    out.float().sum().backward()
    for f in features:
        assert f.grad.dtype == torch.bfloat16
        assert f.grad.is_contiguous(memory_format=memory_format)


def test_pooling_backward_ops_under_autocast(device):
    """The backward ops, called directly under autocast, run in float32 too."""
    _, rois = single_case(device)
    grad = torch.randn(rois.shape[0], 5, 3, 3, device=device).to(torch.bfloat16)
    with autocast(device):
        got = OPS.roi_align_backward(grad, rois, 0.5, 3, 3, 2, 5, 12, 15, 2, True, "bilinear")
    expected = OPS.roi_align_backward(
        grad.float(), rois, 0.5, 3, 3, 2, 5, 12, 15, 2, True, "bilinear"
    )
    assert got.dtype == torch.bfloat16
    assert_rounded_once(got, expected)
    levels = map_rois_to_levels(rois, 2, 3)
    with autocast(device):
        got = OPS.multilevel_roi_align_backward(
            grad, rois, levels, [0.5, 0.25], [12, 6], [15, 8], 2, 5, 3, 3, 2, True, "bilinear"
        )
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("op", ["nms", "batched_nms"])
def test_nms_under_autocast(device, op):
    boxes = random_boxes(300, 200, 200, 4, 80).to(device)
    scores32 = torch.rand(300, device=device)
    scores = scores32.to(torch.bfloat16)  # as a bfloat16 classifier would give them
    idxs = torch.randint(0, 5, (300,), device=device)
    args = (idxs,) if op == "batched_nms" else ()
    with autocast(device):
        keep = getattr(ops, op)(boxes, scores, *args, 0.5)
    assert keep.dtype == torch.int64
    # float32 boxes, the scores widened: exactly the float32 call on the rounded scores.
    assert torch.equal(keep, getattr(ops, op)(boxes, scores.float(), *args, 0.5))
    # The rounded scores reorder near-ties only: most of the float32 result survives.
    full = getattr(ops, op)(boxes, scores32, *args, 0.5)
    overlap = len(set(keep.tolist()) & set(full.tolist()))
    assert overlap >= 0.9 * len(full)


def test_autocast_leaves_float64_alone(device):
    x, rois = single_case(device)
    x64, rois64 = x.double(), rois.double()
    with autocast(device):
        out = ops.roi_align(x64, rois64, 3, 0.5, 2)
    assert out.dtype == torch.float64
    assert torch.equal(out, ops.roi_align(x64, rois64, 3, 0.5, 2))


# --- float16 / bfloat16 kernels without autocast -------------------------------------------------


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reduced_precision_roi_align(device, dtype, mode, channels_last):
    x, rois = single_case(device)
    features = x.to(dtype)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    features.requires_grad_()
    out = ops.roi_align(features, rois, (3, 4), 0.5, -1, mode=mode)  # float32 RoIs as they are
    assert out.dtype == dtype
    upcast = features.detach().float().requires_grad_()
    expected = ops.roi_align(upcast, rois, (3, 4), 0.5, -1, mode=mode)
    # Computed in float32, rounded once: the float32 result on the same values, rounded.
    assert_rounded_once(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.float())
    # Accumulated in float32, rounded once at the end.
    assert features.grad.dtype == dtype
    assert_rounded_once(features.grad, upcast.grad)


@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_precision_multilevel(device, dtype):
    features = [f.to(dtype).requires_grad_() for f in pyramid(device)]
    rois = pyramid_rois(device).to(dtype)  # reduced-precision RoIs are accepted too
    out = ops.multilevel_roi_align(features, rois, 3, 2, canonical_size=32, canonical_level=3)
    upcast = [f.detach().float().requires_grad_() for f in features]
    expected = ops.multilevel_roi_align(
        upcast, rois.float(), 3, 2, canonical_size=32, canonical_level=3
    )
    assert_rounded_once(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.float())
    for ours, theirs in zip(features, upcast, strict=True):
        assert_rounded_once(ours.grad, theirs.grad)


def test_half_backward_accumulates_in_float32(device):
    """Many small contributions to one pixel: summed in float16 they would stall (each addition
    rounds to the same value); accumulated in float32 and rounded once they do not."""
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float16, device=device, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]], device=device).repeat(4000, 1)
    out = ops.roi_align(x, rois, 1, 1.0, 1, aligned=False)
    out.backward(torch.full_like(out, 0.1))
    # Each RoI samples the pixel centre (1.5, 1.5): weight 1/4 on each of 4 pixels.
    total = 4000 * 0.1 * 0.25
    expected = torch.full((2, 2), total, device=device)
    assert_close(x.grad[0, 0, 1:3, 1:3].float(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_precision_nms(device, dtype):
    boxes = random_boxes(400, 300, 300, 8, 100).to(device)
    scores = torch.rand(400, device=device)
    rounded_boxes, rounded_scores = boxes.to(dtype), scores.to(dtype)
    keep = ops.nms(rounded_boxes, rounded_scores, 0.5)
    # Compared in float32 on the rounded values.
    assert torch.equal(keep, ops.nms(rounded_boxes.float(), rounded_scores.float(), 0.5))
    idxs = torch.randint(0, 3, (400,), device=device)
    assert torch.equal(
        ops.batched_nms(rounded_boxes, rounded_scores, idxs, 0.5),
        ops.batched_nms(rounded_boxes.float(), rounded_scores.float(), idxs, 0.5),
    )
