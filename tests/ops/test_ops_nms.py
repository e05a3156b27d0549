"""ops.nms / ops.batched_nms and the bitmask twin against torchvision and ops.reference."""

import pytest
import torch
import torchvision
from ops_cases import random_boxes
from torchvision.ops.boxes import _batched_nms_vanilla

import ops
from ops import reference


def make_case(n, device, dtype=torch.float32, max_size=120.0, tied_scores=False):
    boxes = random_boxes(n, 400, 500, 2, max_size, dtype).to(device)
    if tied_scores:  # a handful of distinct values: most boxes tie with others
        scores = torch.randint(0, 4, (n,)).to(dtype).to(device)
    else:
        scores = torch.rand(n, dtype=dtype).to(device)
    return boxes, scores


def nms_variants():
    """(name, fn) of our NMS implementations; the bitmask twin only exists on the CPU op."""
    return [
        ("nms", ops.nms),
        ("nms_bitmask", lambda b, s, t: torch.ops.maskrcnn_ops.nms_bitmask(b, s, t)),
        ("reference", reference.nms),
    ]


@pytest.mark.parametrize("n", [1, 7, 300, 2500])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("tied_scores", [False, True])
def test_nms_matches_torchvision(device, n, iou_threshold, tied_scores):
    boxes, scores = make_case(n, device, tied_scores=tied_scores)
    expected = torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold)
    for name, fn in nms_variants():
        if name == "reference" and n > 300:
            continue  # the Python walk is slow; 300 boxes cover its logic
        keep = fn(boxes, scores, iou_threshold)
        assert keep.dtype == torch.int64, name
        assert torch.equal(keep.cpu(), expected), name


def test_nms_float64_and_degenerate_boxes(device):
    boxes, scores = make_case(200, device, torch.float64)
    degenerate = torch.tensor(
        [[5, 5, 5, 5], [5, 5, 5, 5], [1, 1, 9, 9], [1, 1, 9, 9], [3, 0, 3, 20], [1, 1, 9, 9]],
        dtype=torch.float64,
        device=device,
    )
    boxes = torch.cat([boxes, degenerate])  # zero-area duplicates (0/0 IoU) and exact duplicates
    scores = torch.cat([scores, torch.full((6,), 0.5, dtype=torch.float64, device=device)])
    expected = torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5)
    for name, fn in nms_variants():
        assert torch.equal(fn(boxes, scores, 0.5).cpu(), expected), name


def test_nms_empty_and_strided(device):
    empty = ops.nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    boxes, scores = make_case(100, device)
    strided = torch.stack([boxes, boxes], dim=2)[:, :, 0]
    assert not strided.is_contiguous()
    assert torch.equal(ops.nms(strided, scores, 0.5), ops.nms(boxes, scores, 0.5))


def score_then_index(keep, scores):
    by_index = keep.sort().values
    return by_index[scores[by_index].sort(descending=True, stable=True).indices]


def assert_torchvision_batched_keep(keep, expected, scores):
    """``keep`` (from ``ops.batched_nms`` on any device) against torchvision's CPU ``expected``.

    On the CPU they are equal, tie order included. Above 4,000 coordinates torchvision's CPU
    per-class loop orders equal scores with an unstable sort, which ``ops.batched_nms`` reproduces
    by making the same call on its own device; a CUDA sort need not order ties as the CPU one does.
    So on CUDA: the same kept boxes, by decreasing score, equal scores in any order.
    """
    assert keep.dtype == torch.int64
    if keep.device.type == "cpu":
        assert torch.equal(keep, expected)
        return
    keep, scores = keep.cpu(), scores.cpu()
    assert torch.equal(score_then_index(keep, scores), score_then_index(expected, scores))
    assert bool((scores[keep][1:] <= scores[keep][:-1]).all()), "not by decreasing score"


# torchvision switches from the coordinate trick to a per-class loop above 1000 boxes on the CPU.
@pytest.mark.parametrize("n", [0, 1, 200, 2000])
@pytest.mark.parametrize("num_classes", [1, 5, 80])
def test_batched_nms_matches_torchvision(device, n, num_classes):
    # float64, so that torchvision's coordinate offsets lose no precision
    boxes, scores = make_case(n, device, torch.float64, tied_scores=n > 1000)
    idxs = torch.randint(0, num_classes, (n,), device=device)
    expected = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    assert_torchvision_batched_keep(ops.batched_nms(boxes, scores, idxs, 0.5), expected, scores)
    # The raw ops order equal scores by index (stable sorts on every device), as torchvision does
    # below 1000 boxes.
    by_score_then_index = score_then_index(expected, scores.cpu())
    raw_batched = torch.ops.maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(raw_batched.cpu(), by_score_then_index)
    bitmask = torch.ops.maskrcnn_ops.nms_bitmask(boxes, scores, 0.5, idxs)
    assert torch.equal(bitmask.cpu(), by_score_then_index)
    if n <= 200:
        assert torch.equal(reference.batched_nms(boxes, scores, idxs, 0.5).cpu(), expected)


def test_batched_nms_float32_matches_per_class_nms(device):
    boxes, scores = make_case(1500, device, tied_scores=True)
    idxs = torch.randint(-3, 40, (1500,), device=device)  # any integers, negative ones too
    expected = _batched_nms_vanilla(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.6)
    for classes in (idxs, idxs.int()):
        keep = ops.batched_nms(boxes, scores, classes, 0.6)
        assert_torchvision_batched_keep(keep, expected, scores)


def test_argument_errors():
    boxes, scores = make_case(10, "cpu")
    with pytest.raises(RuntimeError, match=r"\[N, 4\]"):
        ops.nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(RuntimeError, match="scores"):
        ops.nms(boxes, scores[:5], 0.5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.nms(boxes, scores.double(), 0.5)
    with pytest.raises(RuntimeError, match="integer"):
        ops.batched_nms(boxes, scores, scores, 0.5)
