"""Training mode: loss names, finite losses with and without objects, and overfitting."""

from __future__ import annotations

import math
import time

import pytest
import torch
from modeling_helpers import LOSS_NAMES, synthetic_batch

from pipeline.config import load_config
from pipeline.modeling import build_model


def small_config(**overrides):
    cfg = load_config("configs/shapes_r18_cpu.yaml")
    cfg.input.min_size_train = [160]
    cfg.input.max_size_train = 192
    cfg.input.min_size_test = 160
    cfg.input.max_size_test = 192
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg.model, section), name, value)
    return cfg


@pytest.mark.parametrize("variant", ["ce", "focal"])
def test_losses_finite_with_and_without_objects(variant):
    torch.manual_seed(0)
    overrides = {}
    if variant == "focal":
        overrides = {"rpn__objectness_loss": "focal", "roi_heads__classifier_loss": "focal"}
    model = build_model(small_config(**overrides)).train()
    first, second, empty = synthetic_batch()
    for batch in ([first, second], [empty, first], [empty, empty]):
        images = [image for image, _ in batch]
        targets = [target for _, target in batch]
        losses = model(images, targets)
        assert set(losses) == LOSS_NAMES
        for name, value in losses.items():
            assert value.dim() == 0 and torch.isfinite(value), (name, value)
        model.zero_grad()
        sum(losses.values()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    # Without objects there is nothing to regress or segment.
    losses = model([empty[0]], [empty[1]])
    assert losses["loss_rpn_box_reg"] == 0 and losses["loss_box_reg"] == 0
    assert losses["loss_mask"] == 0


def test_overfits_two_images():
    torch.manual_seed(0)
    model = build_model(small_config()).train()
    first, second, _ = synthetic_batch()
    images, targets = [first[0], second[0]], [first[1], second[1]]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    history = []
    start = time.process_time()
    for _ in range(80):
        loss = sum(model(images, targets).values())
        assert math.isfinite(loss.item())
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # Stop as soon as the bound is reached (or the time budget of the test is spent). The
        # budget is CPU time (all threads: about 2 x 90 s of wall time uncontended), so a
        # loaded machine slows the test down instead of failing it (it needs ~30 steps).
        if min(history[-3:]) < 0.35 * history[0] or time.process_time() - start > 180:
            break
    assert history[0] > 2.0  # the bound below is far under the initial loss
    assert min(history[-3:]) < 0.35 * history[0], history
