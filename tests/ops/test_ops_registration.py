"""The operators' registrations: opcheck, torch.compile, and the fallback without the kernels."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ops_cases import random_boxes, to_rois
from torch.testing import assert_close

import ops

OPS = torch.ops.maskrcnn_ops
REPO = Path(__file__).resolve().parents[2]


def roi_inputs(device, requires_grad=True):
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, device=device, requires_grad=requires_grad)
    rois = to_rois(random_boxes(6, 20, 24, 2, 20, torch.float64), 2).to(device)
    return x, rois


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_roi_align(device, mode, channels_last):
    x, rois = roi_inputs(device)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(OPS.roi_align, (x, rois, 0.5, 3, 2, 2, True, mode))
    grad = torch.randn(6, 3, 3, 2, dtype=torch.float64, device=device)
    torch.library.opcheck(
        OPS.roi_align_backward,
        (grad, rois, 0.5, 3, 2, 2, 3, 10, 12, 2, True, mode, channels_last),
    )


def test_opcheck_reduced_precision(device):
    x = torch.randn(2, 3, 10, 12, device=device, dtype=torch.bfloat16, requires_grad=True)
    rois = to_rois(random_boxes(6, 20, 24, 2, 20), 2).to(device)  # float32
    torch.library.opcheck(OPS.roi_align, (x, rois, 0.5, 3, 2, 2, True, "bilinear"))
    boxes = random_boxes(40, 50, 50, 5, 30).to(device).half()
    torch.library.opcheck(OPS.nms, (boxes, torch.rand(40, device=device).half(), 0.5))


def test_opcheck_multilevel(device):
    features = [
        torch.randn(2, 3, 16, 16, dtype=torch.float64, device=device, requires_grad=True),
        torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device, requires_grad=True),
    ]
    rois = to_rois(random_boxes(5, 64, 64, 4, 200, torch.float64), 2).to(device)
    levels = torch.tensor([0, 1, 0, 1, 1], device=device)
    scales = [0.25, 0.125]
    torch.library.opcheck(
        OPS.multilevel_roi_align, (features, rois, levels, scales, 2, 2, 2, True, "bilinear")
    )
    grad = torch.randn(5, 3, 2, 2, dtype=torch.float64, device=device)
    torch.library.opcheck(
        OPS.multilevel_roi_align_backward,
        (grad, rois, levels, scales, [16, 8], [16, 8], 2, 3, 2, 2, 2, True, "bilinear"),
    )


def test_opcheck_nms(device):
    boxes = random_boxes(40, 50, 50, 5, 30).to(device)
    scores = torch.rand(40, device=device)
    idxs = torch.randint(0, 3, (40,), device=device)
    torch.library.opcheck(OPS.nms, (boxes, scores, 0.5))
    torch.library.opcheck(OPS.batched_nms, (boxes, scores, idxs, 0.5))
    torch.library.opcheck(OPS.nms_bitmask, (boxes, scores, 0.5, idxs))


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def head(features, coarse, rois):
        single = ops.roi_align(features * 2, rois, 3, 0.5, 2).relu().mean(dim=(2, 3))
        pyramid = ops.multilevel_roi_align([features, coarse], rois, 2, spatial_scales=[0.5, 0.25])
        return single + pyramid.mean(dim=(2, 3))

    x = torch.randn(2, 3, 10, 12, requires_grad=True)
    coarse = torch.randn(2, 3, 5, 6, requires_grad=True)
    rois = to_rois(random_boxes(6, 20, 24, 2, 20), 2)
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(x, coarse, rois)
    assert_close(out, head(x, coarse, rois))
    grads = torch.autograd.grad(out.sum(), (x, coarse))
    expected = torch.autograd.grad(head(x, coarse, rois).sum(), (x, coarse))
    assert_close(grads, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_multilevel_is_one_kernel_launch():
    features = [torch.randn(2, 4, 256 // s, 320 // s, device="cuda") for s in (4, 8, 16, 32)]
    rois = to_rois(random_boxes(50, 256, 320, 8, 600), 2).cuda()
    ops.multilevel_roi_align(features, rois, 7)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        ops.multilevel_roi_align(features, rois, 7)
        torch.cuda.synchronize()
    pooling = [e for e in profile.events() if "pool_forward_kernel" in e.name]
    assert len(pooling) == 1, [e.name for e in profile.events()]


def test_fallback_to_reference_without_kernels():
    """With the compiled extension unloadable, importing ops warns once and uses the reference."""
    script = textwrap.dedent(
        """
        import importlib.util, warnings
        real_find_spec = importlib.util.find_spec
        def find_spec(name, *args, **kwargs):
            if name.startswith("ops._C"):
                return None  # as if the extension were not built
            return real_find_spec(name, *args, **kwargs)
        importlib.util.find_spec = find_spec
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ops
        import torch, torchvision
        from ops import reference
        messages = [str(w.message) for w in caught if "ops:" in str(w.message)]
        assert len(messages) == 1, messages
        assert not ops.HAS_CPU_KERNELS
        x = torch.randn(1, 2, 9, 9)
        rois = torch.tensor([[0, 1.0, 1, 7, 6], [0, 3.0, 0.5, 9, 9]])
        expected = torchvision.ops.roi_align(x, rois, 3, 1.0, 2, True)
        torch.testing.assert_close(ops.roi_align(x, rois, 3, 1.0, 2), expected)
        boxes = rois[:, 1:]
        assert torch.equal(ops.nms(boxes, torch.tensor([0.3, 0.9]), 0.1), torch.tensor([1]))
        print("fallback ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
