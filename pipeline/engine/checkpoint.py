"""Checkpoint files of the train stage: atomic writes, a ``latest`` pointer, the last K kept.

Layout under ``OUTPUT_DIR/checkpoints``:

* ``step_0000100.pt``: one ``torch.save`` dict per saved step (DDP or one process), written
  by global rank 0. It holds the model (``model``, ``model_args``: what
  ``MaskRCNN.from_checkpoint`` needs), the optimizer, scheduler and grad-scaler states, the
  step, the loader's position, the random generators' states, the resolved config (YAML) and
  the MLflow run (``tracking``). Everything loads with ``torch.load(weights_only=True)``.
* ``step_0000100/``: DeepSpeed's own checkpoint directory for that step (every rank writes its
  shard); our client state sits in its ``mp_rank_00_model_states.pt``.
* ``latest``: the name of the newest complete entry. An entry is written under a temporary
  name and renamed, and ``latest`` is replaced after it (also by rename), so a job killed at
  any moment leaves either the previous checkpoint or the new one, never half of one.
* ``FINISHED``: written when the run reached ``train.max_steps``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest"
FINISHED = "FINISHED"
_ENTRY = re.compile(r"^step_(\d+)(\.pt)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or used; the message names the file."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def entry_name(step: int, *, directory: bool) -> str:
    """``step_0000100.pt`` (a file) or ``step_0000100`` (a DeepSpeed directory)."""
    return f"step_{step:07d}" + ("" if directory else ".pt")


def entry_step(path: str | Path) -> int:
    match = _ENTRY.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint entry (expected step_NNNNNNN[.pt])")
    return int(match.group(1))


def list_entries(ckpt_dir: Path) -> list[Path]:
    """Complete entries, oldest first (temporary names never match)."""
    if not ckpt_dir.is_dir():
        return []
    entries = [p for p in ckpt_dir.iterdir() if _ENTRY.match(p.name)]
    return sorted(entries, key=entry_step)


def latest_entry(ckpt_dir: str | Path) -> Path | None:
    """The entry ``latest`` names; the newest entry on disk if the pointer is missing or
    names something that is gone (a pointer is written after its entry, never before)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.exists():
        target = ckpt_dir / pointer.read_text().strip()
        if target.exists() and _ENTRY.match(target.name):
            return target
        log.warning("checkpoint: %s names %s, which is missing", pointer, target.name)
    entries = list_entries(ckpt_dir)
    return entries[-1] if entries else None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """Write ``state`` as ``step_NNNNNNN.pt`` atomically, then publish it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = entry_name(step, directory=False)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp{os.getpid()}"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
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
    if resume == "auto":
        return latest_entry(checkpoint_dir(output_dir))
    path = Path(resume)
    if path.is_dir() and not _ENTRY.match(path.name):  # an output_dir or its checkpoints/
        found = latest_entry(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if found is None:
            raise CheckpointError(f"train.resume={resume}: no checkpoint in that directory")
        return found
    if not path.exists():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint")
    return path


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
