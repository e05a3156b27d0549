"""The process group that ``init_distributed`` asks for on a GPU cluster, under torchrun's
and srun's environments, with the CUDA queries and the group set-up patched (no GPU here):
it must serve CUDA tensors (the gradients, on NCCL) and CPU tensors (the loop's any-rank
flags and loss sums, on gloo)."""

import os

import pytest
import torch
import torch.distributed as dist

from pipeline import distributed

TORCHRUN = {  # rank 11 of 4 nodes x 8 GPUs, under torchrun's agent
    "RANK": "11",
    "WORLD_SIZE": "32",
    "LOCAL_RANK": "3",
    "LOCAL_WORLD_SIZE": "8",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "job",
    "TORCHELASTIC_RESTART_COUNT": "0",
}
SRUN = {  # the same task as one of srun's 32 tasks, without torchrun
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "32",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "8(x4)",
    "SLURM_STEP_NODELIST": "node[01-04]",
}


def backends_by_device(backend: str) -> dict[str, str]:
    """``"cuda:nccl,cpu:gloo"`` -> {cuda: nccl, cpu: gloo}; a plain name serves the devices
    that backend supports."""
    if ":" not in backend:
        devices = dist.Backend.backend_capability[dist.Backend(backend)]
        return dict.fromkeys(devices, backend)
    return dict(pair.split(":") for pair in backend.split(","))


@pytest.fixture
def gpu_cluster(monkeypatch):
    """8 visible GPUs; the calls that would touch them or the network are recorded."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(device=device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "TCPStore", lambda *a, **k: calls.update(store=(a, k)) or "store")
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: f"{prefix}/{store}")

    def init_process_group(backend, **kwargs):
        calls.update(backend=backend, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    return calls


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_a_gpu_job_gets_a_group_for_cuda_and_cpu_tensors(gpu_cluster, monkeypatch, launcher):
    monkeypatch.setattr(os, "environ", dict(TORCHRUN if launcher == "torchrun" else SRUN))
    info = distributed.init_distributed("auto", timeout_s=60)
    assert (info.rank, info.world_size, info.local_rank, info.num_nodes) == (11, 32, 3, 4)
    assert gpu_cluster["device"] == torch.device("cuda", 3)
    served = backends_by_device(gpu_cluster["backend"])
    assert served.get("cuda") == "nccl", gpu_cluster["backend"]
    assert served.get("cpu") == "gloo", gpu_cluster["backend"]
    assert (gpu_cluster["rank"], gpu_cluster["world_size"]) == (11, 32)


def test_the_backend_setting_still_overrides(gpu_cluster, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(TORCHRUN))
    distributed.init_distributed("nccl", timeout_s=60)
    assert gpu_cluster["backend"] == "nccl"


def test_without_cuda_the_group_is_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_backend("auto") == "gloo"


def test_more_processes_than_gpus_on_a_node_stop_in_one_line(gpu_cluster, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "environ", {**TORCHRUN, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(distributed.LaunchError, match="2 processes on this node but 1 GPU"):
        distributed.init_distributed("auto", timeout_s=60)
    assert "backend" not in gpu_cluster  # stopped before the group
    distributed.init_distributed("gloo", timeout_s=60)  # gloo shares the GPU
    assert gpu_cluster["backend"] == "gloo"
