import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.engine.optim import build_scheduler, lr_factor, parameter_groups, scaled_lr


def factor(step, **kw):
    options = dict(
        max_steps=100,
        warmup_iters=10,
        warmup_factor=0.001,
        schedule="multistep",
        milestones=[60, 80],
        gamma=0.1,
    )
    options.update(kw)
    return lr_factor(step, **options)


def test_warmup_is_linear_from_the_factor_to_one():
    assert factor(0) == pytest.approx(0.001)
    assert factor(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert factor(10) == 1.0


def test_multistep_and_cosine_decay():
    assert (
        factor(59) == 1.0 and factor(60) == pytest.approx(0.1) and factor(80) == pytest.approx(0.01)
    )
    cosine = dict(schedule="cosine", warmup_iters=0)
    assert factor(0, **cosine) == 1.0
    assert factor(50, **cosine) == pytest.approx(0.5)
    assert factor(100, **cosine) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(factor(25, **cosine), 0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_and_reference_batch_are_config_errors():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_scheduler(
            optimizer,
            max_steps=1,
            warmup_iters=0,
            warmup_factor=1.0,
            schedule="linear",
            milestones=[],
            gamma=0.1,
        )
    with pytest.raises(ConfigError, match="reference_batch_size"):
        scaled_lr(0.02, global_batch=16, reference_batch_size=0)


def test_lr_scales_linearly_with_the_global_batch():
    assert scaled_lr(0.02, global_batch=16, reference_batch_size=16) == pytest.approx(0.02)
    assert scaled_lr(0.02, global_batch=4, reference_batch_size=16) == pytest.approx(0.005)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 2)
    )
    model[0].weight.requires_grad_(False)  # frozen parameters are left out entirely
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(2, 4)]
    assert len(no_decay["params"]) == 1 + 2 + 2 + 1  # conv bias, BN, GN, linear bias
