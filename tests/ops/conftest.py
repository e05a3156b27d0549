"""Shared fixtures of the ops tests: the device parametrisation and seeded generators."""

import os

import pytest
import torch

# The CUDA poolers' precise RoI-index check (an error naming the RoI) instead of the default
# device-side assert, which would leave the test process's CUDA context unusable: the
# robustness tests check those errors. Read once, at the first CUDA pooler call.
os.environ.setdefault("MASKRCNN_OPS_SYNC_CHECKS", "1")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
