import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.distributed import DistInfo, dist_info_from_env, init_distributed, resolve_backend

REPO = Path(__file__).resolve().parents[2]


def test_single_process_needs_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert info == DistInfo()
    assert info.is_main and info.num_nodes == 1
    # NCCL for CUDA tensors and Gloo for CPU ones where there is a GPU, Gloo alone otherwise.
    expected = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    assert resolve_backend("auto") == expected


def test_env_parsing():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    info = dist_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.num_nodes) == (5, 8, 1, 2)
    assert info.restart_count == 2 and not info.is_main


WORKER = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from pipeline.distributed import init_distributed, shutdown_distributed
    info = init_distributed(timeout_s=60)
    value = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(value)
    print(f"rank {info.rank}/{info.world_size} sum {value.item():.0f}", flush=True)
    shutdown_distributed()
    """
)


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the two workers share the pipe, so their lines may interleave: match, don't split
    assert sorted(re.findall(r"rank \d+/\d+ sum \d+", result.stdout)) == [
        "rank 0/2 sum 3",
        "rank 1/2 sum 3",
    ]
