"""Channels-last features, read in place by the NHWC kernels, against the NCHW kernels."""

import pytest
import torch
import torchvision
from ops_cases import per_image_boxes, random_boxes, to_rois
from torch.testing import assert_close

import ops
from ops import reference
from ops._registration import is_channels_last

IMAGE_H, IMAGE_W = 128, 160


def pyramid(device, dtype, channels=16):
    return [
        torch.randn(2, channels, IMAGE_H // s, IMAGE_W // s, dtype=dtype, device=device)
        for s in (4, 8, 16, 32)
    ]


def make_rois(device, dtype, n=60):
    rois = to_rois(random_boxes(n, IMAGE_H, IMAGE_W, 4, 300, dtype), 2)
    return rois[rois[:, 0].argsort(stable=True)].to(device)


def pool_with_grads(features, rois, grad, **kwargs):
    leaves = [f.detach().clone().requires_grad_() for f in features]
    out = ops.multilevel_roi_align(leaves, rois, **kwargs)
    out.backward(grad)
    return out, [f.grad for f in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multilevel_matches_nchw(device, dtype, mode, aligned, sampling_ratio):
    nchw = pyramid(device, dtype)
    nhwc = [f.to(memory_format=torch.channels_last) for f in nchw]
    assert all(is_channels_last(f) for f in nhwc)
    rois = make_rois(device, dtype)
    kwargs = {"output_size": (7, 5), "sampling_ratio": sampling_ratio, "aligned": aligned}
    kwargs["mode"] = mode
    grad = torch.randn(rois.shape[0], 16, 7, 5, dtype=dtype, device=device)
    out_nchw, grads_nchw = pool_with_grads(nchw, rois, grad, **kwargs)
    out_nhwc, grads_nhwc = pool_with_grads(nhwc, rois, grad, **kwargs)
    assert out_nhwc.is_contiguous()  # NCHW output whatever the input layout
    for g in grads_nhwc:
        assert is_channels_last(g)  # gradients in the features' own layout
    if mode == "bilinear" and device.type == "cpu":
        # Both orders of evaluation are torchvision's: bit-identical.
        assert torch.equal(out_nhwc, out_nchw)
        assert all(torch.equal(a, b) for a, b in zip(grads_nhwc, grads_nchw, strict=True))
    else:
        assert_close(out_nhwc, out_nchw)
        for a, b in zip(grads_nhwc, grads_nchw, strict=True):
            assert_close(a, b)


def test_multilevel_matches_multiscale_roi_align(device):
    features = [f.to(memory_format=torch.channels_last) for f in pyramid(device, torch.float32)]
    rois = make_rois(device, torch.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = pooler(
        {str(i): f for i, f in enumerate(features)},
        per_image_boxes(rois, 2),
        [(IMAGE_H, IMAGE_W)] * 2,
    )
    ours = ops.multilevel_roi_align(features, rois, 7, 2, aligned=False)
    if device.type == "cpu":
        assert torch.equal(ours, theirs)
    else:
        assert_close(ours, theirs)


@pytest.mark.parametrize("channels", [1, 3, 70])
def test_roi_align_channel_counts(device, channels):
    """Channel counts below, between and above the backward's channel blocks (64), and one
    channel, where channels-last and contiguous are the same layout."""
    x = torch.randn(2, channels, 9, 11, dtype=torch.float64, device=device)
    rois = to_rois(random_boxes(12, 18, 22, 1, 30, torch.float64), 2).to(device)
    grad = torch.randn(12, channels, 3, 2, dtype=torch.float64, device=device)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        leaf = x.clone(memory_format=memory_format).requires_grad_()
        out = ops.roi_align(leaf, rois, (3, 2), 0.5, 2)
        out.backward(grad)
        results.append((out, leaf.grad))
    assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_gradcheck_channels_last():
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = torch.tensor(
        [[0, 1.3, 0.7, 9.1, 8.2], [0, -2.0, 3.1, 5.5, 14.0], [0, 4.2, 2.2, 6.1, 3.9]],
        dtype=torch.float64,
    )
    for mode in ("bilinear", "bicubic"):

        def pool(t, mode=mode):
            return ops.roi_align(t, rois, 2, 0.5, 2, True, mode)

        torch.autograd.gradcheck(pool, (x,))
        torch.autograd.gradgradcheck(pool, (x,))


def test_mixed_layouts_fall_back_to_nchw(device):
    nchw = pyramid(device, torch.float32)
    mixed = [nchw[0].to(memory_format=torch.channels_last), *nchw[1:]]
    rois = make_rois(device, torch.float32)
    assert torch.equal(
        ops.multilevel_roi_align(mixed, rois, 3), ops.multilevel_roi_align(nchw, rois, 3)
    )


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 2), (40, 3)])
def test_narrow_maps_and_wide_outputs(device, mode, shape):
    height, width = shape
    x = torch.randn(2, 3, height, width, device=device).to(memory_format=torch.channels_last)
    rois = to_rois(random_boxes(10, 2 * height, 2 * width, 0.5, 2 * max(shape)), 2).to(device)
    for output_size in ((2, 3), (2, 40)):
        x_ = x.clone().requires_grad_()
        out = ops.roi_align(x_, rois, output_size, 0.5, 2, True, mode)
        out.backward(torch.ones_like(out))
        x_ref = x.contiguous().requires_grad_()
        expected = reference.roi_align(x_ref, rois, output_size, 0.5, 2, True, mode)
        expected.backward(torch.ones_like(expected))
        assert_close(out, expected)
        assert_close(x_.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
