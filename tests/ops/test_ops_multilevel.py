"""ops.multilevel_roi_align against torchvision.ops.MultiScaleRoIAlign and ops.reference."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from ops_cases import per_image_boxes, random_boxes, to_rois
from torch.testing import assert_close
from torchvision.ops.poolers import LevelMapper

import ops
from ops import reference
from ops.fpn_levels import level_range, map_rois_to_levels

IMAGE_H, IMAGE_W = 256, 320
STRIDES = (4, 8, 16, 32)


def make_pyramid(device, dtype=torch.float32, batch=2, channels=4):
    return [
        torch.randn(batch, channels, IMAGE_H // s, IMAGE_W // s, dtype=dtype, device=device)
        for s in STRIDES
    ]


def make_rois(device, dtype=torch.float32, n=40, batch=2):
    # 8..600 px: from below P2's canonical range to beyond P5's, so every level is used.
    rois = to_rois(random_boxes(n, IMAGE_H, IMAGE_W, 8, 600, dtype), batch)
    return rois[rois[:, 0].argsort(stable=True)].to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_matches_multiscale_roi_align(device, dtype, sampling_ratio):
    features, rois = make_pyramid(device, dtype), make_rois(device, dtype)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], (7, 5), sampling_ratio)
    theirs = pooler(
        OrderedDict((str(i), f) for i, f in enumerate(features)),
        per_image_boxes(rois, 2),
        [(IMAGE_H, IMAGE_W)] * 2,
    )
    ours = ops.multilevel_roi_align(features, rois, (7, 5), sampling_ratio, aligned=False)
    levels = map_rois_to_levels(rois, 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    if device.type == "cpu":
        assert torch.equal(ours, theirs)
    else:
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
def test_forward_and_backward_match_reference(device, dtype, mode, aligned):
    features = [f.requires_grad_() for f in make_pyramid(device, dtype)]
    rois = make_rois(device, dtype, n=16)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    out = ops.multilevel_roi_align(features, rois, 3, 2, aligned, mode=mode)
    ref_features = [f.detach().clone().requires_grad_() for f in features]
    expected = reference.multilevel_roi_align(ref_features, rois, 3, 2, aligned, mode=mode)
    assert_close(out, expected, **tolerance)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in zip(features, ref_features, strict=True):
        assert_close(ours.grad, theirs.grad, **tolerance)


def test_backward_matches_multiscale_roi_align(device):
    features = [f.requires_grad_() for f in make_pyramid(device)]
    rois = make_rois(device)
    out = ops.multilevel_roi_align(features, rois, 5, 2, aligned=False)
    grad = torch.randn_like(out)
    out.backward(grad)
    tv_features = [f.detach().clone().requires_grad_() for f in features]
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 5, 2)
    expected = pooler(
        OrderedDict((str(i), f) for i, f in enumerate(tv_features)),
        per_image_boxes(rois, 2),
        [(IMAGE_H, IMAGE_W)] * 2,
    )
    expected.backward(grad)
    for ours, theirs in zip(features, tv_features, strict=True):
        if device.type == "cpu":
            assert torch.equal(ours.grad, theirs.grad)
        else:
            assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_threads_give_the_one_thread_result(channels_last):
    """Planes split over threads (each claiming its next plane ahead to prefetch it) give exactly
    the one-thread result, forward and backward, with an image and levels that no RoI reads."""
    features = make_pyramid("cpu", batch=3, channels=64)
    if channels_last:
        features = [f.contiguous(memory_format=torch.channels_last) for f in features]
    rois = make_rois("cpu", n=300, batch=2)
    rois[:, 0] *= 2  # images 0 and 2: image 1's planes are skipped
    rois = rois[(rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]) < 220**2]  # no P5
    grad = torch.randn(len(rois), 64, 7, 7)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [f.detach().clone().requires_grad_() for f in features]
            out = ops.multilevel_roi_align(leaves, rois, 7, 2, aligned=False)
            out.backward(grad)
            results.append((out, [f.grad for f in leaves]))
    finally:
        torch.set_num_threads(previous)
    leaves = [f.detach().clone().requires_grad_() for f in features]
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = pooler(
        OrderedDict((str(i), f) for i, f in enumerate(leaves)),
        per_image_boxes(rois, 3),
        [(IMAGE_H, IMAGE_W)] * 3,
    )
    theirs.backward(grad)  # make_rois sorts by image: the RoIs are in torchvision's order
    (one, one_grads), (two, two_grads) = results
    assert torch.equal(one, two)
    assert torch.equal(two, theirs)
    for a, b, c in zip(one_grads, two_grads, leaves, strict=True):
        assert torch.equal(a, b)
        if channels_last:  # sums in another order than torchvision's NCHW kernel
            assert_close(b, c.grad, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(b, c.grad)
    assert one_grads[3].abs().sum() == 0 and one_grads[0][1].abs().sum() == 0


def test_equals_roi_align_per_level(device):
    features, rois = make_pyramid(device), make_rois(device)
    ours = ops.multilevel_roi_align(features, rois, 4, 2)
    levels = map_rois_to_levels(rois, 2, 5)
    for level, feature in enumerate(features):
        picked = levels == level
        single = ops.roi_align(feature, rois[picked], 4, 1 / STRIDES[level], 2)
        assert torch.equal(ours[picked], single)


def test_level_mapping_matches_torchvision():
    boxes = random_boxes(500, 1000, 1000, 1, 1500)
    # Exact canonical sizes sit on level boundaries, where the eps matters.
    exact = torch.tensor([[0, 0, s, s] for s in (56.0, 112.0, 224.0, 448.0, 896.0)])
    boxes = torch.cat([boxes, exact, torch.zeros(1, 4)])
    rois = to_rois(boxes, 1)
    for k_min, k_max in ((2, 5), (3, 4)):
        expected = LevelMapper(k_min, k_max)([boxes])
        assert torch.equal(map_rois_to_levels(rois, k_min, k_max), expected)


def test_custom_scales_and_canonical_parameters(device):
    features = [torch.randn(1, 2, 12, 12, device=device), torch.randn(1, 2, 6, 6, device=device)]
    rois = torch.tensor([[0, 1.0, 1, 3, 3], [0, 0.5, 0.5, 11, 10]], device=device)
    # P1 and P2 (strides 2 and 4), canonical 8 px at level 2: the small box goes to P1.
    out = ops.multilevel_roi_align(
        features, rois, 2, 2, canonical_size=8, canonical_level=2, spatial_scales=[0.5, 0.25]
    )
    assert torch.equal(out[0], ops.roi_align(features[0], rois[:1], 2, 0.5, 2)[0])
    assert torch.equal(out[1], ops.roi_align(features[1], rois[1:], 2, 0.25, 2)[0])
    with pytest.raises(ValueError, match="consecutive"):
        level_range([0.25, 0.0625])
    with pytest.raises(ValueError, match="spatial_scales"):
        ops.multilevel_roi_align(features, rois, 2, spatial_scales=[0.5])


def test_empty_rois(device):
    features = [f.requires_grad_() for f in make_pyramid(device)]
    out = ops.multilevel_roi_align(features, torch.zeros(0, 5, device=device), 7)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in features)


def test_strided_features(device):
    features, rois = make_pyramid(device), make_rois(device)
    expected = ops.multilevel_roi_align(features, rois, 3)
    channels_last = [f.to(memory_format=torch.channels_last) for f in features]
    assert torch.equal(ops.multilevel_roi_align(channels_last, rois, 3), expected)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_gradcheck(mode):
    features = [
        torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True),
    ]
    rois = torch.tensor([[0, 1.0, 1.5, 4.2, 3.9], [0, 0.3, 0.8, 14.5, 12.1]], dtype=torch.float64)

    def pool(*levels):
        return ops.multilevel_roi_align(
            list(levels),
            rois,
            2,
            2,
            canonical_size=4,
            canonical_level=1,
            mode=mode,
            spatial_scales=[0.5, 0.25],
        )

    torch.autograd.gradcheck(pool, tuple(features))
    torch.autograd.gradgradcheck(pool, tuple(features))
