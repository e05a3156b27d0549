"""The checkpoint part of a training run directory: one contract, below the train stage that
writes it (``pipeline.engine.checkpoint``) and the evaluation that reads it
(``pipeline.evaluation.checkpoints``). Imports nothing of the pipeline.

``OUTPUT_DIR/checkpoints/`` holds:

* entries, one per saved step: ``step_0000100.pt`` (a ``torch.save`` file, DDP or one
  process) or ``step_0000100/`` (DeepSpeed's directory; its ``mp_rank_00_model_states.pt``
  holds the model and our client state). An entry appears under its name only complete: it is
  written under a temporary name and renamed;
* ``latest``: the name of the newest published entry, replaced (by rename) only after its
  entry is in place, and the rotation never removes the entry it names;
* ``FINISHED``: written when the run reached ``train.max_steps``;
* while a save runs, temporary names (``.step_0000100.pt.tmp<pid>``, ``.step_0000100.tmp``,
  ``.latest.tmp<pid>``) that never match an entry; a killed writer's are removed when
  training starts again (see :func:`is_temporary`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINISHED = "FINISHED"
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
ENTRY_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
# A writer's temporary name: a dot, the entry or pointer it becomes, ".tmp", anything after.
_TEMPORARY = re.compile(r"^\.(step_\d+(\.pt)?|latest)\.tmp")


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or used; the message is one line naming it."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def checkpoints_in(path: str | Path) -> Path:
    """The checkpoints directory that ``path`` means: an output_dir's ``checkpoints/``, else
    ``path`` itself."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def entry_name(step: int, *, directory: bool) -> str:
    """``step_0000100.pt`` (a file) or ``step_0000100`` (a DeepSpeed directory)."""
    return f"step_{step:07d}" + ("" if directory else ".pt")


def entry_step(name: str | Path) -> int | None:
    """The step of an entry name (``step_0000100.pt`` -> 100); None for any other name."""
    match = ENTRY_PATTERN.match(Path(name).name)
    return int(match.group(1)) if match else None


def temporary_name(name: str, suffix: str = "") -> str:
    """The name ``name`` (an entry or ``latest``) is written under before its rename."""
    return f".{name}.tmp{suffix}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a writer's temporary name (a leftover, once no save runs)."""
    return _TEMPORARY.match(name) is not None


def list_entries(ckpt_dir: str | Path) -> list[Path]:
    """The entries in ``ckpt_dir``, oldest first (temporary names never match)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    entries = [path for path in ckpt_dir.iterdir() if entry_step(path.name) is not None]
    return sorted(entries, key=lambda path: entry_step(path.name))


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The name ``latest`` holds, None where there is no pointer."""
    try:
        return (Path(ckpt_dir) / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def latest_entry(ckpt_dir: str | Path) -> Path | None:
    """The entry ``latest`` names, for both stages alike.

    Without a pointer (a save killed before its first publish): the newest entry, or None.
    A pointer naming no entry cannot come from a save or the rotation (see the module
    docstring), only from files removed by hand or lost: the newest entry is taken, with a
    warning, since every entry is complete and an older one only repeats steps. A pointer
    with no entry left at all is a CheckpointError: starting the run over, or evaluating
    nothing, would hide that its checkpoints are gone."""
    ckpt_dir = Path(ckpt_dir)
    name = read_latest(ckpt_dir)
    if name is not None and entry_step(name) is not None and (ckpt_dir / name).exists():
        return ckpt_dir / name
    entries = list_entries(ckpt_dir)
    if name is None:
        return entries[-1] if entries else None
    pointer = ckpt_dir / LATEST
    if not entries:
        raise CheckpointError(
            f"checkpoint {pointer}: names {name!r}, which is not there, and no entry is left"
        )
    log.warning("%s names %r, which is not there; taking %s", pointer, name, entries[-1].name)
    return entries[-1]


def resolve_entry(path: str | Path) -> Path:
    """The checkpoint file or DeepSpeed tag directory that ``path`` designates: a file; a
    directory holding ``mp_rank_00_model_states.pt`` (of any tag); or an output_dir or its
    ``checkpoints/``, for the entry ``latest`` names."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return path
    found = latest_entry(checkpoints_in(path))
    if found is None:
        raise CheckpointError(
            f"checkpoint {path}: a directory without {DEEPSPEED_MODEL_FILE}, {LATEST} or "
            f"{CHECKPOINTS}/ entries (not a DeepSpeed checkpoint or a training output_dir)"
        )
    return found
