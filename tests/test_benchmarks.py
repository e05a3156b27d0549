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
