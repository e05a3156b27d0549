"""What torchvision's own test/test_ops.py checks of RoIAlign, NMS and batched NMS, on our API.

RoIAlign forward in float16/32/64 on contiguous or permuted input against a slow expected
implementation; backward gradchecks, contiguous or not; rois as a list of per-image boxes; NMS
against a greedy reference on boxes built to sit at the threshold; both torchvision batched NMS
paths; float16 NMS; argument errors; empty inputs.
"""

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

import ops

POOL = 5


def expected_roi_align(x, rois, pool_h, pool_w, spatial_scale, sampling_ratio, aligned):
    """A slow, independent bilinear RoIAlign in float64 (torchvision's test oracle, rewritten)."""
    x = x.double()
    _, channels, height, width = x.shape
    out = torch.zeros(rois.shape[0], channels, pool_h, pool_w, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0

    def bilinear(plane, y, x_):
        if y < -1.0 or y > height or x_ < -1.0 or x_ > width:
            return torch.zeros(plane.shape[0], dtype=torch.float64)
        y, x_ = max(y, 0.0), max(x_, 0.0)
        y0, x0 = int(y), int(x_)
        y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        if y0 >= height - 1:
            y0, y = height - 1, float(height - 1)
        if x0 >= width - 1:
            x0, x_ = width - 1, float(width - 1)
        ly, lx = y - y0, x_ - x0
        return (
            (1 - ly) * (1 - lx) * plane[:, y0, x0]
            + (1 - ly) * lx * plane[:, y0, x1]
            + ly * (1 - lx) * plane[:, y1, x0]
            + ly * lx * plane[:, y1, x1]
        )

    for r, roi in enumerate(rois.double().tolist()):
        batch = int(roi[0])
        start_w, start_h, end_w, end_h = (c * spatial_scale - offset for c in roi[1:])
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pool_h, roi_w / pool_w
        grid_h = sampling_ratio if sampling_ratio > 0 else int(torch.tensor(bin_h).ceil())
        grid_w = sampling_ratio if sampling_ratio > 0 else int(torch.tensor(bin_w).ceil())
        for i in range(pool_h):
            for j in range(pool_w):
                acc = torch.zeros(channels, dtype=torch.float64)
                for iy in range(grid_h):
                    y = start_h + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x_ = start_w + j * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += bilinear(x[batch], y, x_)
                out[r, :, i, j] = acc / max(grid_h * grid_w, 1)
    return out


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_forward(device, x_dtype, contiguous, aligned):
    x = torch.rand(2, 2 * POOL**2, 10, 10, dtype=x_dtype, device=device)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(
        [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]],
        dtype=x_dtype,
        device=device,
    )
    y = ops.roi_align(x, rois, (POOL, POOL), 1, -1, aligned)
    assert y.dtype == x.dtype
    expected = expected_roi_align(x.cpu(), rois.cpu(), POOL, POOL, 1, -1, aligned)
    tol = 4e-3 if x_dtype == torch.float16 else 1e-5  # torchvision's tolerances
    assert_close(y.cpu().double(), expected, rtol=tol, atol=tol)
    # torchvision itself, which computes float16 in float16: we are at least as close.
    theirs = torchvision.ops.roi_align(x, rois, (POOL, POOL), 1, -1, aligned)
    assert_close(y, theirs, rtol=tol, atol=tol)
    ours_error = (y.cpu().double() - expected).abs().max()
    assert ours_error <= (theirs.cpu().double() - expected).abs().max() + 1e-12


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("contiguous", [True, False])
def test_roi_align_backward_gradcheck(device, seed, contiguous):
    torch.manual_seed(seed)
    pool = 2
    x = torch.rand(1, 2 * pool**2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(
        [[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64, device=device
    )
    torch.autograd.gradcheck(lambda z: ops.roi_align(z, rois, pool, 1.0, 1, False), (x,))


def test_roi_align_boxes_as_list(device):
    x = torch.rand(2, 3, 10, 10, device=device)
    boxes = [
        torch.tensor([[0, 0, 9, 9], [0, 5, 4, 9]], dtype=torch.float32, device=device),
        torch.tensor([[5, 5, 9, 9]], dtype=torch.float32, device=device),
    ]
    rois = torch.tensor(
        [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [1, 5, 5, 9, 9]], dtype=torch.float32, device=device
    )
    assert torch.equal(ops.roi_align(x, boxes, 3, 1.0, 2), ops.roi_align(x, rois, 3, 1.0, 2))
    assert torch.equal(
        ops.roi_align(x, boxes, 3, 1.0, 2, aligned=False),
        torchvision.ops.roi_align(x, boxes, 3, 1.0, 2, aligned=False),
    )
    with pytest.raises(ValueError, match=r"\[L, 4\]"):
        ops.roi_align(x, [rois], 3)


def create_tensors_with_iou(n, iou_thresh):
    """Random boxes whose last box has (barely above) `iou_thresh` IoU with the first."""
    boxes = torch.rand(n, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1, :] = boxes[0, :]
    x0, _, x1, _ = boxes[-1].tolist()
    iou_thresh += 1e-5
    boxes[-1, 2] += (x1 - x0) * (1 - iou_thresh) / iou_thresh
    return boxes, torch.rand(n)


def greedy_nms(boxes, scores, iou_threshold):
    """torchvision's test reference: keep the best box, drop those above the threshold, repeat."""
    iou = torchvision.ops.box_iou(boxes, boxes)
    picked = []
    indexes = scores.sort(descending=True).indices
    while len(indexes) > 0:
        current = indexes[0]
        picked.append(current.item())
        indexes = indexes[1:]
        indexes = indexes[iou[current, indexes] <= iou_threshold]
    return torch.as_tensor(picked, dtype=torch.int64)


@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_nms_against_reference(device, iou, seed):
    torch.manual_seed(seed)
    boxes, scores = create_tensors_with_iou(1000, iou)
    expected = greedy_nms(boxes, scores, iou)
    assert torch.equal(ops.nms(boxes.to(device), scores.to(device), iou).cpu(), expected)


def test_nms_float16(device):
    boxes = torch.tensor(
        [
            [285.3538, 185.5758, 1193.5110, 851.4551],
            [285.1472, 188.7374, 1192.4984, 851.0669],
            [279.2440, 197.9812, 1189.4746, 849.2019],
        ],
        device=device,
    )
    scores = torch.tensor([0.6370, 0.7569, 0.3966], device=device)
    keep32 = ops.nms(boxes, scores, 0.2)
    keep16 = ops.nms(boxes.half(), scores.half(), 0.2)
    assert torch.equal(keep32, keep16)


@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nms_autocast_cpu(iou, dtype):
    boxes, scores = create_tensors_with_iou(1000, iou)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keep_float = ops.nms(boxes.to(dtype).float(), scores.to(dtype).float(), iou)
        keep_dtype = ops.nms(boxes.to(dtype), scores.to(dtype), iou)
    assert torch.equal(keep_float, keep_dtype)


@pytest.mark.parametrize("seed", range(5))
def test_batched_nms_both_torchvision_paths(device, seed):
    torch.manual_seed(seed)
    n = 1000
    boxes = torch.cat((torch.rand(n, 2), torch.rand(n, 2) + 10), dim=1)
    scores = torch.rand(n)
    idxs = torch.randint(0, 4, size=(n,))
    vanilla = _batched_nms_vanilla(boxes, scores, idxs, 0.9)
    trick = _batched_nms_coordinate_trick(boxes, scores, idxs, 0.9)
    assert torch.equal(vanilla, trick)
    ours = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.9).cpu()
    assert torch.equal(ours, trick)  # ours orders like torchvision at this size
    assert torch.equal(ours.sort().values, vanilla.sort().values)


def test_nms_input_errors():
    with pytest.raises(RuntimeError):
        ops.nms(torch.rand(4), torch.rand(3), 0.5)
    with pytest.raises(RuntimeError):
        ops.nms(torch.rand(3, 5), torch.rand(3), 0.5)
    with pytest.raises(RuntimeError):
        ops.nms(torch.rand(3, 4), torch.rand(3, 2), 0.5)
    with pytest.raises(RuntimeError):
        ops.nms(torch.rand(3, 4), torch.rand(4), 0.5)


def test_empty_inputs(device):
    empty = torch.empty((0,), dtype=torch.int64)
    assert torch.equal(ops.batched_nms(empty, None, None, None), empty)
    assert torch.equal(torchvision.ops.batched_nms(empty, None, None, None), empty)
    no_boxes = torch.zeros(0, 4, device=device)
    kept = ops.nms(no_boxes, torch.zeros(0, device=device), 0.5)
    assert kept.dtype == torch.int64 and kept.numel() == 0 and kept.device == no_boxes.device
    idxs = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.batched_nms(no_boxes, torch.zeros(0, device=device), idxs, 0.5).numel() == 0
    # RoIAlign: no RoIs, and an empty batch, in every dtype and with any other argument.
    for dtype in (torch.float16, torch.float32, torch.float64):
        x = torch.rand(2, 3, 10, 10, dtype=dtype, device=device, requires_grad=True)
        out = ops.roi_align(x, torch.zeros(0, 5, dtype=dtype, device=device), (2, 3), 0.5, 0)
        assert out.shape == (0, 3, 2, 3) and out.dtype == dtype
        out.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        empty_batch = torch.rand(0, 3, 10, 10, dtype=dtype, device=device)
        no_rois = torch.zeros(0, 5, dtype=dtype, device=device)
        assert ops.roi_align(empty_batch, no_rois, 4, mode="bicubic").shape == (0, 3, 4, 4)
        assert torchvision.ops.roi_align(empty_batch, no_rois, 4).shape == (0, 3, 4, 4)
