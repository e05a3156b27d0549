"""slurm/torchrun_node.sh across two hosts: the part of train.sbatch that the one-node test
cluster cannot show. Two network namespaces joined by a veth link act as two nodes; each runs
the script as its srun task would (SLURM_NODEID 0 and 1), and the four workers all-reduce."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import torch, torch.distributed as dist
from pipeline.distributed import init_distributed, shutdown_distributed
info = init_distributed(timeout_s=60)
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
print(f"rank {info.rank}/{info.world_size} nodes {info.num_nodes} sum {value.item():.0f}")
shutdown_distributed()
"""


def ip(*args: str):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces h1 (10.250.0.1 on v1) and h2 (10.250.0.2 on v2), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and the ip command")
    tag = str(os.getpid())
    hosts = [(f"pt{tag}a", f"pv{tag}a", "10.250.0.1"), (f"pt{tag}b", f"pv{tag}b", "10.250.0.2")]
    try:
        for ns, _, _ in hosts:
            ip("netns", "add", ns)
        ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, link, address in hosts:
            ip("link", "set", link, "netns", ns)
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", link)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", link, "up")
    except subprocess.CalledProcessError as error:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces: {error.stderr.strip()}")
    try:
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_torchrun_node_script_joins_two_nodes(two_hosts, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    master = two_hosts[0][2]
    base = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "NNODES": "2",
            "NPROC_PER_NODE": "2", "MASTER_HOST": master, "RDZV_PORT": "29555",
            "SHUTDOWN_TIMEOUT": "30", "SLURM_JOB_ID": "77", "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = []
    for node, (ns, link, address) in enumerate(two_hosts):
        # Both namespaces share this machine's host name, which resolves to neither address:
        # gloo's interface and torchrun's own address are given (a real cluster needs neither).
        env = {**base, "SLURM_NODEID": str(node), "GLOO_SOCKET_IFNAME": link,
               "TORCHRUN_ARGS": f"--local-addr {address}"}  # fmt: skip
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "bash", str(REPO / "slurm" / "torchrun_node.sh"),
             str(script)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        ))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    lines = sorted(re.findall(r"rank \d/4 nodes 2 sum \d+", "".join(outputs)))
    assert lines == [f"rank {r}/4 nodes 2 sum 10" for r in range(4)]
    assert all(len(re.findall(r"rank \d/4", out)) == 2 for out in outputs)  # 2 per node
