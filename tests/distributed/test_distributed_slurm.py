"""The Slurm path of pipeline.distributed: one srun task per process, without torchrun."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from pipeline.distributed import (
    dist_info_from_env,
    expand_hostlist,
    nodelist_hosts,
    parse_tasks_per_node,
    port_for_job,
    uses_slurm_tasks,
)

REPO = Path(__file__).resolve().parents[2]

HOSTLISTS = {
    "node[01-03,07],gpu5": ["node01", "node02", "node03", "node07", "gpu5"],
    "a[8-10]": ["a8", "a9", "a10"],
    "n[001-3]": ["n001", "n002", "n003"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
    "n[1-2],m[3]": ["n1", "n2", "m3"],
    "x[1],y": ["x1", "y"],
    "single": ["single"],
}


@pytest.mark.parametrize("hostlist", sorted(HOSTLISTS))
def test_expand_hostlist(hostlist):
    assert expand_hostlist(hostlist) == HOSTLISTS[hostlist]
    assert nodelist_hosts(hostlist, use_scontrol=False) == HOSTLISTS[hostlist]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("n[1-2", "unbalanced '\\['"),
        ("n1-2]", "unbalanced '\\]'"),
        ("n[3-1]", "descending range"),
        ("n[a-b]", "bad range 'a-b'"),
        ("n[[1]]", "nested"),
        (" , ", "empty"),
    ],
)
def test_expand_hostlist_rejects_bad_lists(bad, reason):
    with pytest.raises(ValueError, match=reason):
        expand_hostlist(bad)


# Agreement with `scontrol show hostnames`: tests/slurm/test_slurm_hostlist.py, where Slurm
# gets installed (here it would run first and skip on a fresh machine).


def test_nodelist_hosts_falls_back_without_scontrol(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert nodelist_hosts("gpu[7-8]") == ["gpu7", "gpu8"]


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="tasks per node '2\\(x'"):
        parse_tasks_per_node("2(x")


def srun_env(**extra):
    """An srun task's variables: task 3 of 4, the second task on the second of two nodes."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[06-08]",
        "SLURM_RESTART_COUNT": "2",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_task_env():
    info = dist_info_from_env(srun_env())
    assert info.source == "slurm"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert info.num_nodes == 2 and info.restart_count == 2 and not info.is_main
    # rank 0 runs on the step's first node, not the job's
    assert info.master_addr == "gpu07"
    assert info.master_port == port_for_job(4242) == 14242


def test_slurm_task_env_overrides():
    info = dist_info_from_env(srun_env(MASTER_ADDR="10.0.0.1", MASTER_PORT="29555"))
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29555)
    # no step variables: the job's node list and task counts
    info = dist_info_from_env(
        srun_env(
            SLURM_STEP_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="1,3"
        )
    )
    assert info.master_addr == "gpu06" and info.local_world_size == 3
    assert 10000 <= port_for_job(123456789) < 30000


@pytest.mark.parametrize(
    "extra",
    [
        {"RANK": "3", "WORLD_SIZE": "4"},  # under torchrun: its variables win
        {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # a one-task step
        {"SLURM_STEP_ID": None},  # the batch shell of an sbatch --ntasks=4 job
        {"SLURM_STEP_ID": str(0xFFFFFFFB)},  # Slurm's batch step id
    ],
)
def test_other_launchers_keep_their_path(extra):
    env = srun_env(**extra)
    assert not uses_slurm_tasks(env)
    info = dist_info_from_env(env)
    assert info.source == "env"
    assert info.world_size == int(env.get("WORLD_SIZE", 1))


def test_bad_slurm_env_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        dist_info_from_env(srun_env(SLURM_PROCID="x"))
    with pytest.raises(ValueError, match=r"none of .*SLURM_STEP_NODELIST"):
        dist_info_from_env(
            srun_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None, SLURM_NODELIST=None)
        )


WORKER = """
import os, torch, torch.distributed as dist
from pipeline.distributed import init_distributed, shutdown_distributed
info = init_distributed(timeout_s=60)
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
print(f"{info.source} rank {info.rank}/{info.world_size} env {os.environ['RANK']} "
      f"sum {value.item():.0f}", flush=True)
shutdown_distributed()
"""


@pytest.mark.slow
def test_two_slurm_tasks_form_one_group(tmp_path):
    """Two processes with only srun's variables join one gloo group (no Slurm needed)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_PORT=str(port))

    def task_env(rank: int) -> dict:
        one_node = {"SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost"}
        counts = {"SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2"}
        ids = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        return {**base, **srun_env(**one_node, **counts, **ids)}

    procs = [
        subprocess.Popen([sys.executable, str(script)], env=task_env(rank), text=True, stdout=PIPE)
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = sorted(re.search(r"slurm rank .*", out).group(0) for out in outputs)
    assert lines == ["slurm rank 0/2 env 0 sum 3", "slurm rank 1/2 env 1 sum 3"]
