"""Bad indices, NaN and inverted boxes, deterministic mode."""

import pytest
import torch
from ops_cases import random_boxes, to_rois

import ops
from ops import reference
from ops.fpn_levels import map_rois_to_levels

OPS = torch.ops.maskrcnn_ops
NAN = float("nan")
INF = float("inf")

# Every box is unusable: NaN, infinite, inverted in x, in y, in both.
BAD_BOXES = [
    [NAN, 2.0, 8.0, 9.0],
    [1.0, 2.0, NAN, 9.0],
    [-INF, 2.0, 8.0, 9.0],
    [1.0, 2.0, INF, 9.0],
    [8.0, 2.0, 1.0, 9.0],
    [1.0, 9.0, 8.0, 2.0],
    [8.0, 9.0, 1.0, 2.0],
]


def test_bad_batch_index_names_the_roi(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    for batch_index in (2.0, -1.0, NAN):
        rois = torch.tensor([[0, 1.0, 1, 5, 5], [batch_index, 1.0, 1, 5, 5]], device=device)
        with pytest.raises(RuntimeError, match=r"RoI 1 has batch index .* outside \[0, 2\)"):
            ops.roi_align(x, rois, 2)
        with pytest.raises(RuntimeError, match="RoI 1 has batch index"):
            ops.multilevel_roi_align([x, x[:, :, ::2, ::2]], rois, 2)
    grad = torch.randn(2, 3, 2, 2, device=device)
    with pytest.raises(RuntimeError, match="RoI 1 has batch index"):
        OPS.roi_align_backward(grad, rois, 1.0, 2, 2, 2, 3, 8, 8, 2, True, "bilinear")


def test_bad_level_names_the_roi(device):
    features = [torch.randn(1, 2, 8, 8, device=device), torch.randn(1, 2, 4, 4, device=device)]
    rois = torch.tensor([[0, 1.0, 1, 5, 5], [0, 1.0, 1, 5, 5]], device=device)
    for level in (2, -1):
        levels = torch.tensor([0, level], device=device)
        with pytest.raises(RuntimeError, match=f"RoI 1 maps to level {level} but there are 2"):
            OPS.multilevel_roi_align(features, rois, levels, [0.5, 0.25], 2, 2, 2, True, "bilinear")
        grad = torch.randn(2, 2, 2, 2, device=device)
        with pytest.raises(RuntimeError, match="RoI 1 maps to level"):
            OPS.multilevel_roi_align_backward(
                grad, rois, levels, [0.5, 0.25], [8, 4], [8, 4], 1, 2, 2, 2, 2, True, "bilinear"
            )


def test_nan_and_inverted_boxes_get_a_level():
    rois = to_rois(torch.tensor(BAD_BOXES), 1)
    levels = map_rois_to_levels(rois, 2, 5)
    assert ((levels >= 0) & (levels <= 3)).all()
    assert levels[0] == 0 and levels[1] == 0 and levels[4] == 0  # NaN sizes: level 0


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_and_inverted_boxes_pool_to_zeros(device, mode, aligned, sampling_ratio, channels_last):
    good = [[1.0, 1.0, 12.0, 10.0]]
    rois = to_rois(torch.tensor(BAD_BOXES + good), 2).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    features = [
        torch.randn(2, 3, 16, 16, device=device).to(memory_format=memory_format).requires_grad_(),
        torch.randn(2, 3, 8, 8, device=device).to(memory_format=memory_format).requires_grad_(),
    ]
    out = ops.multilevel_roi_align(
        features, rois, 3, sampling_ratio, aligned, 8, 3, mode, spatial_scales=[1.0, 0.5]
    )
    assert out[: len(BAD_BOXES)].abs().max() == 0
    assert out[-1].abs().max() > 0
    single = ops.roi_align(features[0], rois, 3, 1.0, sampling_ratio, aligned, mode)
    assert single[: len(BAD_BOXES)].abs().max() == 0
    expected = reference.roi_align(
        features[0].detach(), rois, 3, 1.0, sampling_ratio, aligned, mode
    )
    torch.testing.assert_close(single, expected)
    # No gradient from the bad boxes.
    grad = torch.zeros_like(out)
    grad[: len(BAD_BOXES)] = 1.0
    out.backward(grad)
    assert all(f.grad.abs().max() == 0 for f in features)


def _pool_and_grads(features, rois):
    features = [f.detach().clone().requires_grad_() for f in features]
    out = ops.multilevel_roi_align(features, rois, 5, 2, canonical_size=32, canonical_level=3)
    out.backward(torch.ones_like(out) + out.detach())
    return out, [f.grad for f in features]


@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic_mode_cpu(channels_last):
    """The CPU kernels accumulate without atomics: deterministic mode runs them reproducibly."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    features = [torch.randn(2, 8, 32 // s, 40 // s).to(memory_format=memory_format) for s in (1, 2)]
    rois = to_rois(random_boxes(200, 32, 40, 2, 60), 2)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _pool_and_grads(features, rois)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _pool_and_grads([f.bfloat16() for f in features], rois)
        second = _pool_and_grads(features, rois)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_mode_cuda_alerts():
    features = [torch.randn(1, 4, 16, 16, device="cuda", requires_grad=True)]
    rois = torch.tensor([[0, 1.0, 1, 9, 9], [0, 2.0, 2, 8, 8]], device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ops.multilevel_roi_align(features, rois, 2, spatial_scales=[0.5])  # forward: fine
        with pytest.raises(RuntimeError, match="multilevel_roi_align_backward_cuda"):
            out.sum().backward()
        x = features[0].detach().requires_grad_()
        with pytest.raises(RuntimeError, match="roi_align_backward_cuda"):
            ops.roi_align(x, rois, 2, 0.5).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        x = features[0].detach().requires_grad_()
        with pytest.warns(UserWarning, match="roi_align_backward_cuda"):
            ops.roi_align(x, rois, 2, 0.5).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
