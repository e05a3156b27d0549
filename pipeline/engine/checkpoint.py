"""Checkpoint files of the train stage: durable atomic writes, a ``latest`` pointer, the
last K kept, a killed writer's leftovers removed. The layout and its names are the run
directory's contract (``pipeline/rundir.py``), which the evaluation reads too.

* ``step_0000100.pt``: one ``torch.save`` dict per saved step (DDP or one process), written
  by global rank 0. It holds the model (``model``, ``model_args``: what
  ``MaskRCNN.from_checkpoint`` needs), the optimizer, scheduler and grad-scaler states, the
  step, the loader's position, the random generators' states, the resolved config (YAML) and
  the MLflow run (``tracking``). Everything loads with ``torch.load(weights_only=True)``.
* ``step_0000100/``: DeepSpeed's own checkpoint directory for that step (every rank writes its
  shard); our client state sits in its ``mp_rank_00_model_states.pt``.

An entry is written under a temporary name, synced, renamed, and the directory synced; then
``latest`` is written the same way. So a job killed, or a machine that loses power, at any
moment leaves either the previous checkpoint or the new one, never half of one, and never a
``latest`` that names an entry the disk does not have.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.rundir import (
    FINISHED,
    LATEST,
    CheckpointError,
    checkpoint_dir,
    entry_name,
    entry_step,
    is_temporary,
    latest_entry,
    list_entries,
    resolve_entry,
    temporary_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "FINISHED",
    "LATEST",
    "CheckpointError",
    "checkpoint_dir",
    "entry_name",
    "entry_step",
    "fsync_path",
    "latest_entry",
    "list_entries",
    "load_file_checkpoint",
    "move_into_place",
    "publish",
    "remove_leftovers",
    "remove_path",
    "resolve_resume",
    "rng_state",
    "save_file_checkpoint",
    "set_rng_state",
    "sync_tree",
    "temporary_name",
    "write_text_atomic",
]


def fsync_path(path: Path) -> None:
    """Sync a file, or a directory's entries (the names that renames changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # a file system that cannot sync a directory
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Sync every file under ``root``, then its directories, deepest first (DeepSpeed writes
    its files without syncing them)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove the temporary files and directories of saves that were killed (at a training
    start, when no save runs); returns their names."""
    if not ckpt_dir.is_dir():
        return []
    names = sorted(path.name for path in ckpt_dir.iterdir() if is_temporary(path.name))
    for name in names:
        remove_path(ckpt_dir / name)
    if names:
        log.warning("checkpoint: removed what killed saves left in %s: %s", ckpt_dir, names)
    return names


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, then sync their directory so that the new name is on disk
    before anything (``latest``) refers to it. A directory cannot be renamed onto a non-empty
    one: an entry already there (saved but never published by a killed run, or by the run
    before a resume from an earlier step) is moved aside under a temporary name first."""
    aside = None
    if final.is_dir() and not final.is_symlink():
        aside = final.with_name(temporary_name(final.name, ".replaced"))
        remove_path(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if aside is not None:
        remove_path(aside)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(temporary_name(path.name, str(os.getpid())))
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    move_into_place(tmp, path)


def publish(ckpt_dir: Path, name: str, keep: int) -> None:
    """Point ``latest`` at ``name`` and delete all but the newest ``keep`` entries."""
    write_text_atomic(ckpt_dir / LATEST, name + "\n")
    if keep <= 0:
        return
    for old in list_entries(ckpt_dir)[:-keep]:
        if old.name == name:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def save_file_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as ``step_NNNNNNN.pt`` atomically and durably, then publish it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = entry_name(step, directory=False)
    final = ckpt_dir / name
    tmp = ckpt_dir / temporary_name(name, str(os.getpid()))
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    move_into_place(tmp, final)
    publish(ckpt_dir, name, keep)
    return final


def load_file_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict (``weights_only=True``); one-line errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, not a torch file, unsafe types
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"checkpoint {path} cannot be read: {reason}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no 'model' state dict")
    return state


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The entry to resume from for ``train.resume`` (auto, never, or a path)."""
    if resume == "never":
        return None
    try:
        if resume == "auto":
            return latest_entry(checkpoint_dir(output_dir))
        return resolve_entry(resume)
    except CheckpointError as error:
        hint = "; set train.resume=never to start afresh" if resume == "auto" else ""
        raise CheckpointError(f"train.resume={resume}: {error}{hint}") from None


# --- random generators ----------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The process-global generators (Python, NumPy, torch CPU and CUDA), in types that
    ``torch.load(weights_only=True)`` accepts. The model's own sampling generator is reseeded
    from the step (see ``loop.py``), so it needs no state here."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
