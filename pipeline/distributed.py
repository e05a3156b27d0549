"""Process-group set-up from the launcher's environment, shared by the train and eval stages.

``torchrun`` (one or many nodes, c10d rendezvous) and plain ``python`` (one process) both
work. NCCL is used with GPUs and gloo without.

Under torchrun the elastic agent already hosts a TCP store at ``MASTER_ADDR:MASTER_PORT``.
After a restart (``--max-restarts``) the new workers would read the previous attempt's
addresses from that store, and with gloo the regrouping then fails or hangs now and then.
Keying the group's store by the restart count (``TORCHELASTIC_RESTART_COUNT``) gives every
attempt a clean namespace; this was seen to recover every time where plain ``env://``
failed about one time in three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def dist_info_from_env(env: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if env is None else env
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def resolve_backend(backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the job's process group (a no-op for a single process) and pick the device."""
    info = dist_info_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(info))
    if info.world_size == 1 or dist.is_initialized():
        return info
    backend = resolve_backend(backend)
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
