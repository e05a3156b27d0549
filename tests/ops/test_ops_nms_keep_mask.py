"""ops.nms_keep_mask, the fixed-size NMS: the same boxes as the index-list NMS, as a keep mask."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ops_cases import random_boxes

import ops
from pipeline.modeling.fixed_size import top_kept


def case(n, num_classes, device, tied):
    boxes = random_boxes(n, 300, 300, 2, 120.0, torch.float32).to(device)
    scores = (torch.randint(0, 4, (n,)).float() if tied else torch.rand(n)).to(device)
    idxs = torch.randint(0, num_classes, (n,)).to(device)
    return boxes, scores, idxs


def as_mask(keep, n):
    mask = torch.zeros(n, dtype=torch.bool, device=keep.device)
    return mask.index_fill_(0, keep, True)


@pytest.mark.parametrize("n", [0, 1, 9, 300, 2500])
@pytest.mark.parametrize("num_classes", [1, 5])
@pytest.mark.parametrize("tied", [False, True])
def test_keep_mask_keeps_what_the_index_list_keeps(device, n, num_classes, tied):
    boxes, scores, idxs = case(n, num_classes, device, tied)
    for threshold in (0.3, 0.7):
        expected = as_mask(ops.batched_nms(boxes, scores, idxs, threshold), n)
        assert torch.equal(ops.nms_keep_mask(boxes, scores, threshold, idxs), expected)
        plain = as_mask(ops.nms(boxes, scores, threshold), n)
        assert torch.equal(ops.nms_keep_mask(boxes, scores, threshold), plain)


@pytest.mark.parametrize("tied", [False, True])
def test_padding_boxes_are_neither_kept_nor_suppress(device, tied):
    """Negative idxs: the result on the other boxes is that of the NMS without the padding."""
    boxes, scores, idxs = case(600, 3, device, tied)
    padding = torch.rand(600, device=device) < 0.4
    keep = ops.nms_keep_mask(boxes, scores, 0.5, torch.where(padding, -1, idxs))
    real = torch.where(~padding)[0]
    kept = ops.batched_nms(boxes[real], scores[real], idxs[real], 0.5)
    assert torch.equal(keep, as_mask(real[kept], 600))
    everything = torch.full_like(idxs, -1)
    assert not ops.nms_keep_mask(boxes, scores, 0.5, everything).any()


@pytest.mark.parametrize("tied", [False, True])
def test_top_kept_is_the_head_of_the_index_list(device, tied):
    """The fixed-size selection (masked sort of the kept scores, padded, marked valid) gives
    the index-list NMS's first k, in its order (equal scores by increasing index)."""
    boxes, scores, idxs = case(1500, 4, device, tied)
    keep = ops.nms_keep_mask(boxes, scores, 0.6, idxs)
    expected = ops.batched_nms(boxes, scores, idxs, 0.6)
    if not tied:  # the index list orders ties as torchvision does above 1,000 boxes
        for k in (10, expected.numel(), 2000):
            order, valid = top_kept(scores[None], keep[None], k)
            assert order.shape == (1, min(k, 1500))
            assert torch.equal(order[0][valid[0]], expected[:k])
            assert int(valid.sum()) == min(k, expected.numel())
    small = case(200, 3, device, tied)  # below 1,000 boxes: ties by increasing index
    keep = ops.nms_keep_mask(*small[:2], 0.5, small[2])
    order, valid = top_kept(small[1][None], keep[None], 50)
    expected = ops.batched_nms(small[0], small[1], small[2], 0.5)[:50]
    assert torch.equal(order[0][valid[0]], expected)


def test_keep_mask_reference_matches(device):
    from ops import reference

    boxes, scores, idxs = case(200, 3, device, False)
    idxs[::7] = -1
    mask = ops.nms_keep_mask(boxes, scores, 0.5, idxs)
    real = torch.where(idxs >= 0)[0]
    kept = reference.batched_nms(boxes[real], scores[real], idxs[real], 0.5)
    assert torch.equal(mask, as_mask(real[kept], 200))


def test_keep_mask_opcheck():
    boxes, scores, idxs = case(50, 3, "cpu", False)
    idxs[3] = -1
    torch.library.opcheck(torch.ops.maskrcnn_ops.nms_keep_mask, (boxes, scores, 0.5, idxs))
    torch.library.opcheck(torch.ops.maskrcnn_ops.nms_keep_mask, (boxes, scores, 0.5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bad_roi_index_is_a_device_assert(tmp_path):
    """Without MASKRCNN_OPS_SYNC_CHECKS the CUDA pooler validates on the device: a bad batch
    index fails as a device-side assert at the next synchronisation (in a subprocess: it
    leaves the CUDA context unusable)."""
    code = (
        "import torch, ops\n"
        "x = torch.randn(2, 3, 8, 8, device='cuda')\n"
        "rois = torch.tensor([[0, 1.0, 1, 5, 5], [5, 1.0, 1, 5, 5]], device='cuda')\n"
        "ops.roi_align(x, rois, 2)\n"
        "torch.cuda.synchronize()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MASKRCNN_OPS_SYNC_CHECKS"}
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "out of range" in result.stderr or "device-side assert" in result.stderr
