"""``CpuSyncBatchNorm2d`` in 2 real processes (torchrun, gloo) against ``nn.BatchNorm2d`` over
the whole global batch in one process.

The ranks hold different numbers of images of different padded sizes, as Mask R-CNN's ranks
do: a mean of per-rank means would weight a rank's pixels by the inverse of its share. The
reference puts every rank's pixels side by side in one [1, C, 1, P] tensor, so that one
BatchNorm2d normalizes over exactly the pixels of the global batch.

This file is also the workers' script: ``python -m torch.distributed.run ... THIS_FILE OUT``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

CHANNELS = 5
# (images, height, width) of each rank's padded batch.
RANK_BATCHES = [(3, 5, 6), (1, 4, 7)]
MOMENTUM = 0.3
EPS = 1e-5


def global_batch(dtype=torch.float32):
    """Each rank's input and the gradient of the loss with respect to its output: the loss is
    sum over ranks of (output * grad_out).sum(), so the gradients are those of one global loss."""
    generator = torch.Generator().manual_seed(3)
    inputs, grad_outs = [], []
    for images, height, width in RANK_BATCHES:
        shape = (images, CHANNELS, height, width)
        # An offset and a per-channel spread: the variance must not come from E[x^2] - E[x]^2
        # cancelling in float32.
        spread = torch.linspace(0.5, 4.0, CHANNELS).reshape(1, -1, 1, 1)
        inputs.append(torch.randn(shape, generator=generator) * spread + 3.0)
        grad_outs.append(torch.randn(shape, generator=generator))
    return [x.to(dtype) for x in inputs], [g.to(dtype) for g in grad_outs]


def initialised(module: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Non-trivial affine parameters and running statistics, the same in every process."""
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        module.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
        module.running_mean.copy_(torch.linspace(-0.2, 0.2, CHANNELS))
        module.running_var.copy_(torch.linspace(0.8, 1.2, CHANNELS))
    return module


def pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [C, N*H*W]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def worker(out: Path) -> None:
    import torch.distributed as dist

    from pipeline.engine.sync_bn import CpuSyncBatchNorm2d

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs, grad_outs = global_batch()
    module = initialised(CpuSyncBatchNorm2d(CHANNELS, eps=EPS, momentum=MOMENTUM))
    x = inputs[rank].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = module(x)
        (y * grad_outs[rank]).sum().backward()
    torch.save(
        {
            "output": y.detach(),
            "input_grad": x.grad,
            "weight_grad": module.weight.grad,
            "bias_grad": module.bias.grad,
            "running_mean": module.running_mean,
            "running_var": module.running_var,
            "num_batches_tracked": module.num_batches_tracked,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        },
        out / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from engine_helpers import free_port, train_env

    out = tmp_path_factory.mktemp("sync_bn")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        __file__, str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=train_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """BatchNorm2d over every pixel of the global batch, in float64."""
    inputs, grad_outs = global_batch(torch.float64)
    module = initialised(nn.BatchNorm2d(CHANNELS, eps=EPS, momentum=MOMENTUM)).double()
    x = [t.clone().requires_grad_() for t in inputs]
    joined = torch.cat([pixels(t) for t in x], dim=1)[None, :, None, :]  # [1, C, 1, P]
    y = module(joined)
    (y * torch.cat([pixels(g) for g in grad_outs], dim=1)[None, :, None, :]).sum().backward()
    outputs, start = [], 0
    for t in inputs:
        count = t.numel() // CHANNELS
        part = y.detach()[0, :, 0, start : start + count]  # [C, N*H*W] of this rank
        outputs.append(part.reshape(CHANNELS, t.shape[0], *t.shape[2:]).transpose(0, 1))
        start += count
    return {
        "outputs": outputs,
        "input_grads": [t.grad for t in x],
        "weight_grad": module.weight.grad,
        "bias_grad": module.bias.grad,
        "running_mean": module.running_mean,
        "running_var": module.running_var,
    }


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_batch_statistics_are_those_of_the_global_batch(ranks, reference):
    # The output is the input normalized with the batch mean and variance.
    for rank, result in enumerate(ranks):
        close(result["output"], reference["outputs"][rank])


@pytest.mark.slow
def test_running_statistics_are_those_of_the_global_batch(ranks, reference):
    for result in ranks:  # the same on every rank: nothing for DDP to broadcast
        close(result["running_mean"], reference["running_mean"])
        close(result["running_var"], reference["running_var"])  # unbiased over all pixels
        assert int(result["num_batches_tracked"]) == 1


@pytest.mark.slow
def test_gradients_are_those_of_the_global_batch(ranks, reference):
    for rank, result in enumerate(ranks):
        close(result["input_grad"], reference["input_grads"][rank])
    # Each rank's weight and bias gradients are of its own part of the loss; DDP then
    # averages them, as it does every parameter's. Their sum is the global gradient.
    close(sum(r["weight_grad"] for r in ranks), reference["weight_grad"])
    close(sum(r["bias_grad"] for r in ranks), reference["bias_grad"])


@pytest.mark.slow
def test_no_deprecation_warning(ranks):
    # torch.distributed.nn.functional.all_reduce printed a FutureWarning on every run.
    assert [r["warnings"] for r in ranks] == [[], []]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
