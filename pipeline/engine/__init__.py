"""The train stage: the loop, checkpoints, strategies (DDP, DeepSpeed) and schedules.

Uses ``modeling``, ``data`` and ``tracking``; never ``evaluation``."""

from .checkpoint import CheckpointError, latest_entry, load_file_checkpoint
from .loop import train
from .nonfinite import NonFiniteLossError
from .preemption import PREEMPTED_EXIT_CODE

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "NonFiniteLossError",
    "latest_entry",
    "load_file_checkpoint",
    "train",
]
