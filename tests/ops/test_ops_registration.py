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


def run_python(script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter of the repository (the ops load at its import)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=120,
    )  # fmt: skip


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
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def fake_cuda_inputs():
    """CUDA tensors without a GPU: FakeTensors on device "cuda", what a GPU box's tensors (and
    torch.compile's tracing there) present to the ops' dispatch. Call inside a FakeTensorMode."""
    x = torch.empty(2, 3, 16, 16, device="cuda")
    coarse = torch.empty(2, 3, 8, 8, device="cuda")
    rois = torch.zeros(4, 5, device="cuda")
    boxes = torch.zeros(4, 4, device="cuda")
    scores = torch.zeros(4, device="cuda")
    idxs = torch.zeros(4, dtype=torch.int64, device="cuda")
    return {
        "roi_align": lambda: ops.roi_align(x, rois, 2, 0.5),
        "multilevel_roi_align": lambda: ops.multilevel_roi_align(
            [x, coarse], rois, 2, spatial_scales=[0.5, 0.25]
        ),
        "nms": lambda: ops.nms(boxes, scores, 0.5),
        "batched_nms": lambda: ops.batched_nms(boxes, scores, idxs, 0.5),
    }


def test_cuda_tensors_without_cuda_kernels_raise(monkeypatch):
    """No ops._C_cuda: a CUDA tensor stops with one line on how to build the kernels, instead of
    running ops.reference on the GPU (tens of GB of index tensors, NMS walked on the host)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ops import _extension, reference

    monkeypatch.setattr(_extension, "HAS_CUDA_KERNELS", False)
    monkeypatch.setattr(_extension, "_CUDA_LOAD_ERROR", "ops._C_cuda is not built")
    for name in ("roi_align", "multilevel_roi_align", "nms", "batched_nms"):
        monkeypatch.setattr(reference, name, lambda *a, _name=name, **k: pytest.fail(_name))
    with FakeTensorMode():
        calls = fake_cuda_inputs()
        for name, call in calls.items():
            with pytest.raises(ops.CUDAKernelsNotBuiltError) as caught:
                call()
            message = str(caught.value)
            assert isinstance(caught.value, RuntimeError), name
            assert "\n" not in message, name
            assert "ops._C_cuda is not built" in message, name
            assert "FORCE_CUDA=1" in message, name


def test_cuda_tensors_with_cuda_kernels_use_them(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ops import _extension

    monkeypatch.setattr(_extension, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_extension, "HAS_CPU_KERNELS", False)  # irrelevant to CUDA tensors
    with FakeTensorMode():
        assert not _extension.use_reference(torch.empty(3, device="cuda"))
    assert _extension.use_reference(torch.empty(3))  # CPU tensors: the reference, as before


def test_gpu_box_without_cuda_build_raises_on_cuda_tensors():
    """A machine with a GPU and ops._C but no ops._C_cuda (built without nvcc): importing ops is
    silent, CPU tensors use the CPU kernels, CUDA tensors raise the build hint."""
    script = textwrap.dedent(
        """
        import importlib.util, warnings
        import torch
        torch.cuda.is_available = lambda: True  # a GPU box
        real_find_spec = importlib.util.find_spec
        def find_spec(name, *args, **kwargs):
            if name == "ops._C_cuda":
                return None  # built without nvcc
            return real_find_spec(name, *args, **kwargs)
        importlib.util.find_spec = find_spec
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ops
        messages = [str(w.message) for w in caught if "ops:" in str(w.message)]
        assert not messages, messages
        assert ops.HAS_CPU_KERNELS and not ops.HAS_CUDA_KERNELS
        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]])
        assert torch.equal(ops.nms(boxes, torch.tensor([0.3, 0.9]), 0.5), torch.tensor([1]))
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            features = torch.empty(1, 2, 9, 9, device="cuda")
            rois = torch.zeros(3, 5, device="cuda")
            try:
                ops.roi_align(features, rois, 3)
            except ops.CUDAKernelsNotBuiltError as error:
                print("raised:", error)
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raised: ops:"), result.stdout
    assert "ops._C_cuda is not built" in lines[0] and "FORCE_CUDA=1" in lines[0]
