"""train.amp validation: fp16 needs CUDA, and bf16 on a CPU without native bf16 warns."""

import logging

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.engine import strategy


def test_unknown_amp_and_cpu_fp16_are_config_errors():
    with pytest.raises(ConfigError, match=r"train\.amp='half'"):
        strategy.check_amp("half", torch.device("cpu"))
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        strategy.check_amp("fp16", torch.device("cpu"))


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, fast):
    monkeypatch.setattr(strategy, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        strategy.check_amp("bf16", torch.device("cpu"))
        strategy.check_amp("off", torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if "AVX512-BF16" in r.getMessage()]
    assert len(warnings) == (0 if fast else 1)
    if not fast:
        assert "train.amp=off is faster here" in warnings[0]
