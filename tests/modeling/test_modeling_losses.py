"""The focal loss against its formula, and the config choosing it."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from modeling_helpers import synthetic_batch
from test_modeling_training import small_config

import pipeline.modeling.roi_heads as roi_heads_module
import pipeline.modeling.rpn as rpn_module
from pipeline.modeling import build_model, sigmoid_focal_loss


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.75, 0.5), (-1.0, 1.5)])
def test_sigmoid_focal_loss_formula(alpha, gamma):
    torch.manual_seed(0)
    logits = torch.randn(64) * 3
    targets = (torch.rand(64) > 0.7).float()
    expected = []
    for x, t in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t == 1 else 1 - p
        alpha_t = 1.0 if alpha < 0 else (alpha if t == 1 else 1 - alpha)
        expected.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
    expected = torch.tensor(expected)
    loss = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="sum"), expected.sum()
    )
    reference = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean")
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean"), reference
    )


class Spy:
    """Wraps sigmoid_focal_loss, recording each call's targets and result."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits, targets, alpha, gamma, reduction="sum"):
        result = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
        self.calls.append((targets.detach().clone(), result.detach().clone(), alpha, gamma))
        return result


@pytest.mark.parametrize(
    ("objectness_loss", "classifier_loss"), [("bce", "ce"), ("focal", "ce"), ("bce", "focal")]
)
def test_config_selects_focal_loss(monkeypatch, objectness_loss, classifier_loss):
    rpn_spy, roi_spy = Spy(), Spy()
    monkeypatch.setattr(rpn_module, "sigmoid_focal_loss", rpn_spy)
    monkeypatch.setattr(roi_heads_module, "sigmoid_focal_loss", roi_spy)
    cfg = small_config(
        rpn__objectness_loss=objectness_loss, roi_heads__classifier_loss=classifier_loss
    )
    cfg.model.focal.alpha, cfg.model.focal.gamma = 0.3, 1.5
    torch.manual_seed(0)
    model = build_model(cfg).train()
    first, second, _ = synthetic_batch()
    losses = model([first[0], second[0]], [first[1], second[1]])

    assert len(rpn_spy.calls) == (objectness_loss == "focal")
    assert len(roi_spy.calls) == (classifier_loss == "focal")
    for spy, name in ((rpn_spy, "loss_objectness"), (roi_spy, "loss_classifier")):
        if spy.calls:
            targets, summed, alpha, gamma = spy.calls[0]
            assert (alpha, gamma) == (0.3, 1.5)
            # Normalised by the number of foreground samples (each has exactly one 1).
            num_foreground = max(1.0, targets.sum().item())
            torch.testing.assert_close(losses[name].detach(), summed / num_foreground)
    num_logits = model.roi_heads.box_predictor.cls_score.out_features
    assert num_logits == (cfg.model.num_classes - 1 if classifier_loss == "focal" else 4)
