"""ops.roi_align against torchvision.ops.roi_align and against ops.reference."""

import pytest
import torch
import torchvision
from ops_cases import random_boxes, to_rois
from torch.testing import assert_close

import ops
from ops import reference

BATCH, CHANNELS, HEIGHT, WIDTH = 2, 3, 13, 17
SCALE = 0.5  # the image is 26 x 34


def make_case(device, dtype=torch.float32, num_rois=24):
    x = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, dtype=dtype, device=device)
    # Sizes up to 60 px on a 26 x 34 image: many RoIs stick out of the map.
    rois = to_rois(random_boxes(num_rois, 26, 34, 0.5, 60, dtype), BATCH).to(device)
    return x, rois


def assert_matches_torchvision(ours, theirs, device):
    if device.type == "cpu":
        # Same arithmetic in the same order: bit-identical.
        assert torch.equal(ours, theirs)
    else:
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2, 3])
def test_bilinear_forward_matches_torchvision(device, dtype, aligned, sampling_ratio):
    x, rois = make_case(device, dtype)
    ours = ops.roi_align(x, rois, (5, 4), SCALE, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(x, rois, (5, 4), SCALE, sampling_ratio, aligned)
    assert ours.shape == (rois.shape[0], CHANNELS, 5, 4)
    assert_matches_torchvision(ours, theirs, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2, 3])
def test_bilinear_backward_matches_torchvision(device, dtype, aligned, sampling_ratio):
    x, rois = make_case(device, dtype)
    grad = torch.randn(rois.shape[0], CHANNELS, 3, 3, dtype=dtype, device=device)
    grads = []
    for fn in (ops.roi_align, torchvision.ops.roi_align):
        x_ = x.clone().requires_grad_()
        fn(x_, rois, 3, SCALE, sampling_ratio, aligned).backward(grad)
        grads.append(x_.grad)
    assert_matches_torchvision(grads[0], grads[1], device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_forward_and_backward_match_reference(device, dtype, mode, aligned, sampling_ratio):
    x, rois = make_case(device, dtype)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    outputs, grads = [], []
    for fn in (ops.roi_align, reference.roi_align):
        x_ = x.clone().requires_grad_()
        out = fn(x_, rois, (4, 3), SCALE, sampling_ratio, aligned, mode)
        out.backward(torch.ones_like(out))
        outputs.append(out)
        grads.append(x_.grad)
    assert_close(outputs[0], outputs[1], **tolerance)
    assert_close(grads[0], grads[1], **tolerance)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 2), (40, 3)])
def test_narrow_maps_and_wide_outputs(device, mode, shape):
    """float32 maps narrower than the taps, and outputs wider than the vectorised CPU path takes,
    go through the generic kernel."""
    height, width = shape
    x = torch.randn(2, 3, height, width, device=device)
    rois = to_rois(random_boxes(10, 2 * height, 2 * width, 0.5, 2 * max(shape)), 2).to(device)
    for output_size in ((2, 3), (2, 40)):
        x_ = x.clone().requires_grad_()
        out = ops.roi_align(x_, rois, output_size, SCALE, 2, True, mode)
        out.backward(torch.ones_like(out))
        x_ref = x.clone().requires_grad_()
        expected = reference.roi_align(x_ref, rois, output_size, SCALE, 2, True, mode)
        expected.backward(torch.ones_like(expected))
        assert_close(out, expected)
        # Each pixel of a tiny map sums hundreds of float32 contributions, in different orders.
        assert_close(x_.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_reference_matches_torchvision():
    x, rois = make_case("cpu", torch.float64)
    for aligned in (True, False):
        for sampling_ratio in (-1, 2):
            assert_close(
                reference.roi_align(x, rois, 3, SCALE, sampling_ratio, aligned),
                torchvision.ops.roi_align(x, rois, 3, SCALE, sampling_ratio, aligned),
            )


def test_bicubic_differs_from_bilinear_but_keeps_constants(device):
    x, rois = make_case(device, torch.float64)
    bilinear = ops.roi_align(x, rois, 3, SCALE, 2, mode="bilinear")
    bicubic = ops.roi_align(x, rois, 3, SCALE, 2, mode="bicubic")
    assert not torch.allclose(bilinear, bicubic)
    # The Keys weights sum to one: a constant map pools to the constant wherever samples land.
    constant = torch.full_like(x, 2.5)
    inside = torch.tensor([[0, 2.0, 2.0, 20.0, 18.0]], dtype=x.dtype, device=device)
    assert_close(
        ops.roi_align(constant, inside, 3, SCALE, 2, mode="bicubic"),
        torch.full((1, CHANNELS, 3, 3), 2.5, dtype=x.dtype, device=device),
    )


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
def test_edge_rois(device, mode, aligned):
    x = torch.randn(1, 2, 9, 11, dtype=torch.float64, device=device)
    boxes = [
        [3.0, 3.0, 3.0, 3.0],  # zero size
        [5.0, 2.0, 5.0, 7.0],  # zero width
        [-40.0, -40.0, -30.0, -30.0],  # wholly outside, before the map
        [30.0, 30.0, 45.0, 50.0],  # wholly outside, after the map
        [-3.0, -2.0, 4.0, 5.0],  # partly outside
        [8.0, 6.0, 14.0, 12.0],  # partly outside, bottom right
        [0.0, 0.0, 11.0, 9.0],  # exactly the map
        [6.0, 6.0, 2.0, 1.0],  # inverted: zeros here, an artefact of its arithmetic there
        [-1000.0, -2000.0, 3000.0, 4000.0],  # huge
    ]
    rois = torch.tensor([[0.0, *b] for b in boxes], dtype=torch.float64, device=device)
    for sampling_ratio in (2, -1):
        if sampling_ratio == -1:
            rois = rois[:-1]  # adaptive sampling of the huge box would take millions of samples
        ours = ops.roi_align(x, rois, 3, 1.0, sampling_ratio, aligned, mode)
        assert_close(ours, reference.roi_align(x, rois, 3, 1.0, sampling_ratio, aligned, mode))
        if mode == "bilinear":
            theirs = torchvision.ops.roi_align(x, rois, 3, 1.0, sampling_ratio, aligned)
            usable = [i for i in range(rois.shape[0]) if i != 7]
            assert_matches_torchvision(ours[usable], theirs[usable], device)
        assert ours[7].abs().max() == 0
    # Wholly outside the map: every sample is beyond [-1, size], so the bins are zero.
    assert ours[2].abs().max() == 0 and ours[3].abs().max() == 0


def test_empty_inputs(device):
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    rois = torch.zeros(0, 5, device=device)
    out = ops.roi_align(x, rois, 4, 0.5)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    no_channels = torch.randn(2, 0, 8, 8, device=device)
    assert ops.roi_align(
        no_channels, torch.tensor([[0, 1.0, 1, 5, 5]], device=device), 2
    ).shape == (1, 0, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_inputs(device, dtype):
    x, rois = make_case(device, dtype)
    expected = ops.roi_align(x, rois, 3, SCALE, 2)
    channels_last = x.to(memory_format=torch.channels_last)
    sliced = torch.randn(BATCH, 2 * CHANNELS, HEIGHT, 2 * WIDTH, dtype=dtype, device=device)
    sliced = sliced[:, ::2, :, ::2]
    sliced.copy_(x)
    rois_strided = torch.stack([rois, rois], dim=2)[:, :, 0]  # non-contiguous view
    assert not rois_strided.is_contiguous() and not sliced.is_contiguous()
    for features in (channels_last, sliced):
        assert torch.equal(ops.roi_align(features, rois_strided, 3, SCALE, 2), expected)
    # Gradients flow back to a channels-last input too.
    x_cl = channels_last.clone().requires_grad_()
    ops.roi_align(x_cl, rois, 3, SCALE, 2).sum().backward()
    x_ref = x.clone().requires_grad_()
    ops.roi_align(x_ref, rois, 3, SCALE, 2).sum().backward()
    assert_close(x_cl.grad, x_ref.grad)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck(mode, aligned):
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.3, 0.7, 9.1, 8.2], [0, -2.0, 3.1, 5.5, 14.0], [0, 4.2, 2.2, 6.1, 3.9]],
        dtype=torch.float64,
    )
    torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, 2, 0.5, 2, aligned, mode), (x,))
    torch.autograd.gradgradcheck(lambda t: ops.roi_align(t, rois, 2, 0.5, 2, aligned, mode), (x,))


def test_argument_errors():
    x = torch.randn(1, 2, 8, 8)
    good = torch.tensor([[0, 1.0, 1, 5, 5]])
    with pytest.raises(ValueError, match="mode"):
        ops.roi_align(x, good, 2, mode="nearest")
    with pytest.raises(RuntimeError, match=r"\[K, 5\]"):
        ops.roi_align(x, good[:, 1:], 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.roi_align(x, good.long(), 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.roi_align(x.long(), good, 2)
    # RoIs of another floating dtype are read in the features' compute type.
    assert torch.equal(ops.roi_align(x, good.double(), 2), ops.roi_align(x, good, 2))
    with pytest.raises(RuntimeError, match="batch index"):
        ops.roi_align(x, torch.tensor([[1, 1.0, 1, 5, 5]]), 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_and_gradients_match_torchvision(device, channels_last):
    """Outputs and gradients over 2 MB take huge-page buffers on the CPU (cpu_memory.h): the same
    values as torchvision's, on ordinary pages."""
    x = torch.randn(2, 64, 100, 136, device=device)  # 7 MB
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = to_rois(random_boxes(300, 400, 544, 8, 300), 2).to(device)  # output: 3.8 MB
    grad = torch.randn(300, 64, 7, 7, device=device)
    results = []
    for fn in (ops.roi_align, torchvision.ops.roi_align):
        x_ = x.clone().requires_grad_()
        out = fn(x_, rois, 7, 0.25, 2, aligned=False)
        out.backward(grad)
        results.append((out, x_.grad))
    (ours, ours_grad), (theirs, theirs_grad) = results
    assert_matches_torchvision(ours, theirs, device)
    if channels_last:  # sums in another order than torchvision's NCHW kernel
        assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-5)
    else:
        assert_matches_torchvision(ours_grad, theirs_grad, device)
