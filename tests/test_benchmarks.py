"""The benchmarks must keep running: a smoke run of each quick variant (figures are not
asserted here; they belong in the benchmarks' own output)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ops.py", "data.py"])
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
