"""Process-group set-up from the launcher's environment, shared by the train and eval stages.

``torchrun`` (one or many nodes, c10d rendezvous) and plain ``python`` (one process) both
work. With GPUs the group serves both devices, ``cuda:nccl,cpu:gloo`` (as torchtitan does):
CUDA tensors go to NCCL, while the small CPU tensors and Python objects of the loop's
cross-rank checks (``pipeline.collectives``) go to gloo; a group of NCCL alone has no CPU
backend and refuses them. Without GPUs the group is gloo.

Under torchrun the elastic agent already hosts a TCP store at ``MASTER_ADDR:MASTER_PORT``.
After a restart (``--max-restarts``) the new workers would read the previous attempt's
addresses from that store, and with gloo the regrouping then fails or hangs now and then.
Keying the group's store by the restart count (``TORCHELASTIC_RESTART_COUNT``) gives every
attempt a clean namespace; this was seen to recover every time where plain ``env://``
failed about one time in three.

Under ``srun`` without torchrun (one Slurm task per process, ``srun --ntasks-per-node=G
python launch/train.py ...``) the tasks carry no ``RANK``/``WORLD_SIZE``; they take rank,
world size and local rank from ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``, the
master address from the first host of the step's node list and a port derived from the job
id (``MASTER_ADDR``/``MASTER_PORT`` override both). Rank 0 hosts the TCP store. That path
applies only inside an srun step with more than one task: the batch shell of an sbatch job
(no ``SLURM_STEP_ID``) and a one-task step stay one process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0
    source: str = "env"
    """env: torchrun, another env:// launcher or one process; slurm: one srun task each."""
    master_addr: str = ""
    """Address of rank 0's TCP store (Slurm path only; torchrun passes MASTER_ADDR)."""
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def dist_info_from_env(env: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if env is None else env
    if uses_slurm_tasks(env):
        return slurm_dist_info(env)
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


# --- Slurm: one srun task per process ---------------------------------------------------------

# Step ids at and above this are Slurm's special steps (batch script, extern, interactive).
_SPECIAL_STEP_IDS = 0xFFFFFFF0


def uses_slurm_tasks(env) -> bool:
    """True for an srun task of a multi-task step that no launcher gave RANK/WORLD_SIZE."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return False
    try:
        ntasks = int(env.get("SLURM_NTASKS", "1"))
        step = int(env.get("SLURM_STEP_ID", str(_SPECIAL_STEP_IDS)))
    except ValueError:
        return False
    return ntasks > 1 and step < _SPECIAL_STEP_IDS


def slurm_dist_info(env) -> DistInfo:
    """Rank, world size, local rank and rank 0's address from an srun task's environment."""
    rank = _int_var(env, "SLURM_PROCID")
    world_size = _int_var(env, "SLURM_NTASKS")
    local_rank = _int_var(env, "SLURM_LOCALID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts = parse_tasks_per_node(per_node) if per_node else []
    node = _int_var(env, "SLURM_NODEID", 0)
    local_world_size = counts[node] if node < len(counts) else max(local_rank + 1, 1)
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    else:
        name = next((n for n in _NODELIST_VARS if env.get(n)), None)
        if name is None:
            raise ValueError(f"Slurm task without a node list: none of {_NODELIST_VARS} is set")
        master_addr = nodelist_hosts(env[name])[0]
    if "MASTER_PORT" in env:
        master_port = _int_var(env, "MASTER_PORT")
    else:
        master_port = port_for_job(_int_var(env, "SLURM_JOB_ID"))
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        restart_count=_int_var(env, "SLURM_RESTART_COUNT", 0),
        source="slurm",
        master_addr=master_addr,
        master_port=master_port,
    )


# The step's nodes first: rank 0 runs on the first node of the step, which may be a subset.
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _int_var(env, name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"Slurm task environment: {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Slurm task environment: {name}={value!r} is not an integer") from None


def port_for_job(job_id: int) -> int:
    """A port per job in 10000-29999, below Linux's ephemeral range (32768 and up), so two
    jobs sharing a node rarely meet. slurm/common.sh derives its rendezvous port the same way."""
    return 10000 + job_id % 20000


def parse_tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed task counts per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"cannot parse Slurm tasks per node {value!r} (at {item!r})")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def nodelist_hosts(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """The host names of a Slurm node list, in order.

    ``scontrol show hostnames`` is the authority when it is installed (it knows every syntax
    of the installed Slurm); otherwise, or when it fails, ``expand_hostlist`` parses it.
    """
    if use_scontrol and shutil.which("scontrol"):
        try:
            result = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
            )
            hosts = result.stdout.split()
            if result.returncode == 0 and hosts:
                return hosts
            log.debug("scontrol show hostnames %s failed: %s", nodelist, result.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("scontrol show hostnames %s failed: %s", nodelist, exc)
    return expand_hostlist(nodelist)


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list: ``"node[01-03,07],gpu5"`` -> node01 node02 node03 node07
    gpu5. Ranges keep the width of their lower bound (``[08-10]``: 08 09 10); several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]``: r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for name in _split_outside_brackets(hostlist, hostlist):
        hosts.extend(_expand_name(name, hostlist))
    if not hosts:
        raise ValueError(f"empty Slurm host list {hostlist!r}")
    return hosts


def _split_outside_brackets(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm host list {whole!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {whole!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm host list {whole!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_name(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, rest = name[: match.start()], name[match.end() :]
    suffixes = _expand_name(rest, whole)
    names = []
    for part in match.group(1).split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            low, high = int(bounds[0]), int(bounds[1])
            if high < low:
                raise ValueError(f"descending range [{part}] in Slurm host list {whole!r}")
            numbers = [str(n).zfill(len(bounds[0])) for n in range(low, high + 1)]
        else:
            raise ValueError(f"bad range {part!r} in Slurm host list {whole!r}")
        names.extend(prefix + number + suffix for number in numbers for suffix in suffixes)
    return names


class LaunchError(RuntimeError):
    """The job's layout cannot work on this machine (said in one line)."""


def resolve_backend(backend: str = "auto") -> str:
    """``distributed.backend``: "auto" serves CPU and CUDA tensors where CUDA is present;
    any other value (``nccl``, ``gloo``, ``cuda:nccl,cpu:gloo``, ...) is used as given."""
    if backend != "auto":
        return backend
    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the job's process group (a no-op for a single process) and pick the device."""
    info = dist_info_from_env()
    if info.source == "slurm":
        # Libraries that read the env:// variables themselves (DeepSpeed) see the same job.
        os.environ.update(
            RANK=str(info.rank),
            WORLD_SIZE=str(info.world_size),
            LOCAL_RANK=str(info.local_rank),
            LOCAL_WORLD_SIZE=str(info.local_world_size),
            MASTER_ADDR=info.master_addr,
            MASTER_PORT=str(info.master_port),
        )
    backend = resolve_backend(backend)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if "nccl" in backend and info.world_size > 1 and info.local_world_size > gpus:
            # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") at the first
            # collective; say so before anything starts.
            raise LaunchError(
                f"{info.local_world_size} processes on this node but {gpus} GPU(s) visible: "
                f"NCCL needs a GPU per process; start at most {gpus} per node "
                "(--nproc-per-node, --ntasks-per-node) or set distributed.backend=gloo"
            )
        torch.cuda.set_device(device_for(info))
    if info.world_size == 1 or dist.is_initialized():
        return info
    timeout = timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: the agent hosts the store
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            info.world_size,
            is_master=False,
            timeout=timeout,
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"attempt{info.restart_count}", store),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    elif info.source == "slurm":  # one srun task per process: rank 0 hosts the store
        store = dist.TCPStore(
            info.master_addr,
            info.master_port,
            info.world_size,
            is_master=info.rank == 0,
            timeout=timeout,
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"slurm{info.restart_count}", store),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    else:  # another launcher that sets the env:// variables (srun with a wrapper, mpirun)
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    return info


def shutdown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
