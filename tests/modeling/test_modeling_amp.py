"""Mixed precision at the model level: the model under ``torch.autocast("cpu", bfloat16)``, as
``train.amp=bf16`` runs it on the CPU (``pipeline/engine/strategy.py``). The convolutions and
linear layers run in bfloat16 while the weights, the losses, the box decoding and the
detections stay float32; a short bf16 training run learns like the float32 one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from modeling_helpers import LOSS_NAMES, tiny_batch, tiny_config

from pipeline.modeling import build_model


def bf16_autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


SIZE = 96  # px: bf16 convolutions are slow on CPUs without AVX-512 (see the last test)


def small_model() -> torch.nn.Module:
    """ResNet-18, 32-channel FPN and heads, trainable BatchNorm, 96-px input; the same
    weights and sampling draws on every call."""
    cfg = tiny_config(**{"backbone.depth": 18, "backbone.norm": "bn"})
    cfg.input.min_size_train, cfg.input.max_size_train = [SIZE], SIZE
    cfg.input.min_size_test, cfg.input.max_size_test = SIZE, SIZE
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_generator(torch.Generator().manual_seed(0))
    return model


def rectangles(num_images: int) -> tuple[list[torch.Tensor], list[dict]]:
    """``tiny_batch``'s rectangles of classes 1..3, scaled from 128 px to SIZE."""
    images, targets = tiny_batch(size=128, num_images=num_images)
    scale = SIZE / 128
    images = [F.interpolate(image[None], size=(SIZE, SIZE), mode="bilinear")[0] for image in images]
    for target in targets:
        target["boxes"] = target["boxes"] * scale
        masks = F.interpolate(target["masks"][:, None].float(), size=(SIZE, SIZE))
        target["masks"] = masks[:, 0].to(torch.uint8)
    return images, targets


def record_output_dtypes(model) -> dict[str, set[torch.dtype]]:
    """The dtypes the backbone, the RPN head and the box and mask heads output, per call."""
    seen: dict[str, set[torch.dtype]] = {}
    parts = {
        "backbone": model.backbone,
        "rpn head": model.rpn.head,
        "box head": model.roi_heads.box_head,
        "mask head": model.roi_heads.mask_head,
    }
    for name, module in parts.items():

        def hook(_module, _inputs, output, name=name):
            outputs = output if isinstance(output, (list, tuple)) else [output]
            for tensor in outputs:
                for leaf in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                    seen.setdefault(name, set()).add(leaf.dtype)

        module.register_forward_hook(hook)
    return seen


def test_bf16_train_step_has_finite_float32_losses_and_gradients():
    model = small_model().train()
    dtypes = record_output_dtypes(model)
    images, targets = rectangles(2)
    with bf16_autocast():
        losses = model(images, targets)
    # The network really ran in bfloat16 (else this test would check float32 twice) ...
    assert dtypes == {name: {torch.bfloat16} for name in dtypes} and len(dtypes) == 4, dtypes
    # ... and the losses are float32 scalars.
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dtype == torch.float32 and value.dim() == 0, (name, value)
        assert torch.isfinite(value) and value > 0, (name, value)
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    for name, param in trainable:
        assert param.dtype == torch.float32, name
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0

    # The same step in float32 (same weights and draws) gives nearly the same losses.
    reference = small_model().train()(images, targets)
    total = float(sum(losses.values()).detach())
    expected = float(sum(reference.values()).detach())
    assert abs(total - expected) < 0.05 * expected, (losses, reference)


def test_bf16_inference_gives_float32_detections_in_image_coordinates():
    model = small_model().eval()
    dtypes = record_output_dtypes(model)
    images, _ = rectangles(2)
    images[1] = F.interpolate(images[1][None], size=(80, 112), mode="bilinear")[0]
    with torch.no_grad(), bf16_autocast():
        detections = model(images)
    assert dtypes["backbone"] == {torch.bfloat16} and dtypes["mask head"] == {torch.bfloat16}
    assert len(detections) == 2
    for image, detection in zip(images, detections, strict=True):
        height, width = image.shape[-2:]
        count = len(detection["boxes"])
        assert count > 0, "a random model scores every class near 1/4: detections expected"
        boxes, scores, masks = detection["boxes"], detection["scores"], detection["masks"]
        assert boxes.dtype == torch.float32 and boxes.shape == (count, 4)
        assert scores.dtype == torch.float32 and scores.shape == (count,)
        assert detection["labels"].dtype == torch.int64 and detection["labels"].min() >= 1
        assert masks.dtype == torch.float32 and masks.shape == (count, 1, height, width)
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height
        assert ((scores > 0) & (scores <= 1)).all()
        assert torch.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1


def train_losses(amp: bool, steps: int) -> list[float]:
    """Total loss per step of SGD on two images of rectangles, in float32 or bf16."""
    model = small_model().train()
    images, targets = rectangles(2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    history = []
    for _ in range(steps):
        with bf16_autocast(amp):
            loss = sum(model(images, targets).values())
        assert math.isfinite(loss.item()), history
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return history


@pytest.mark.slow
def test_bf16_training_loss_falls_like_float32():
    """12 SGD steps each at lr 0.01 (at 0.02 the trajectory jumps about with the thread count,
    1 or 2, so that float32 and bf16 ended 45% apart in one order of the suite). Measured: total
    loss 2.81 -> 1.43 in float32 and 2.83 -> 1.51 in bf16 with 2 threads, 1.57 and 1.59 with 1
    (means of the last 5 steps), 5% and 1% apart. On an AVX2 CPU bf16 costs ~4x
    float32 per step: PyTorch runs bf16 convolutions through oneDNN only where
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (AVX-512 and newer), elsewhere through its
    reference convolution, whose weight gradients then dominate the step."""
    steps = 12
    fp32, bf16 = train_losses(False, steps), train_losses(True, steps)
    # The same start (same weights and draws; bf16 rounding only) ...
    assert abs(bf16[0] - fp32[0]) < 0.05 * fp32[0], (fp32, bf16)
    # ... both learn (the total falls well below the start) ...
    final_fp32, final_bf16 = sum(fp32[-5:]) / 5, sum(bf16[-5:]) / 5
    assert final_fp32 < 0.6 * fp32[0], fp32
    assert final_bf16 < 0.6 * bf16[0], bf16
    # ... and end up alike.
    assert abs(final_bf16 - final_fp32) < 0.25 * final_fp32, (fp32, bf16)
