"""The benchmarks must keep running: a smoke run of each quick variant (figures are not
asserted here; they belong in the benchmarks' own output)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ops.py", "data.py", "eval.py"])
def test_quick_benchmark_runs(script):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio" in result.stdout


@pytest.mark.slow
def test_quick_train_benchmark_runs():
    """Three short training runs (ours in 1 and 2 processes, torchvision): minutes on a busy
    machine, hence the long timeout. The last line is the JSON of every figure."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "ours / torchvision" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])["configurations"]
    assert set(figures) == {"ours, 1 process", "ours, 2 processes", "torchvision"}
    for figure in figures.values():
        assert figure["steps_measured"] == 2
        assert figure["images_per_s_median"] > 0
        assert 0 <= figure["data_wait_share_mean"] < 1


@pytest.mark.slow
def test_quick_syncs_benchmark_runs():
    """The sync counter on 256x256 images, 2 a batch: both models, training and inference, a
    table each; ours' training step has syncs to count (its samplers index with masks)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "syncs.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "waits by op" in result.stdout and "waits by module | line" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])["configurations"]
    assert set(figures) == {
        f"{model}, {mode}, 2 images"
        for model in ("ours", "torchvision")
        for mode in ("training", "inference")
    }
    ours = figures["ours, training, 2 images"]
    assert ours["gpu_waits"] > 0 and ours["issue_count"] > 0
    assert ours["gpu_waits"] == ours["aten_syncs"] + ours["copies"] + ours["cpp_reads"]
    assert sum(ours["by_module"].values()) == ours["gpu_waits"]


def test_sync_counter_rules():
    """What the counter of benchmarks/syncs.py takes for a wait on a GPU, in a few lines whose
    answer is known: mask indexing and item() of device tensors, copies between host and device,
    the backward of a masked index, each under the module that ran it; not reads of tensors a
    GPU run keeps on the host, nor x[mask] = <number> (a masked_fill), though the issue's rule
    counts them."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("syncs", REPO / "benchmarks" / "syncs.py")
    syncs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syncs)

    class Positives(torch.nn.Module):
        def forward(self, x):
            return x[x > 0]  # aten.index with a mask; its backward puts through the mask

    model = torch.nn.Sequential(Positives())
    counter = syncs.SyncCounter(model)
    x = torch.linspace(-1.0, 1.0, 6, requires_grad=True)
    with counter():
        model(x).sum().backward()
        y = x.detach().clone()
        y[y > 0.5] = 0.0  # masked_fill: no wait
        int(y.sum())  # waits
        torch.tensor([1.0], device=y.device)  # host to device copy
        shape = torch.tensor(y.shape)  # made on the host
        int(shape[0]), shape.tolist()  # no wait, no copy
        y.tolist()  # device to host copy
    fig = syncs.figures(counter.counts)
    assert fig["by_module"] == {"0": 1, "0 (backward)": 1, "(outside modules)": 3}
    assert (fig["aten_syncs"], fig["copies"], fig["cpp_reads"]) == (3, 2, 0)
    assert fig["issue_count"] == 5
