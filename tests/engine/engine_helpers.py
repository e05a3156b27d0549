"""Helpers shared by the train-stage tests (a unique module name: no conftest imports)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def tiny_overrides(shards: dict[str, Path], out: Path, **extra) -> list[str]:
    """Overrides that point the tiny config at the test shards and a run directory."""
    values = {
        "data.train_shards": shards["train"],
        "data.val_shards": shards["val"],
        "train.output_dir": out,
        "tracking.enabled": "false",
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(shards, out, **extra):
    return load_config(TINY, tiny_overrides(shards, out, **extra))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_env(**extra) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_command(nproc: int, overrides: list[str], *torchrun_args: str) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), "--config", str(TINY), *overrides]
    if nproc == 0:  # plain python, no launcher
        return [sys.executable, *script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *torchrun_args,
        *script,
    ]


def start_train(command: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """A training job in the background, its stdout and stderr merged into one text pipe."""
    return subprocess.Popen(command, env=env or train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def run_train(
    nproc: int,
    overrides: list[str],
    *torchrun_args: str,
    timeout: int = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(nproc, overrides, *torchrun_args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or train_env(),
    )


def checkpoint_state(out: Path, step: int | None = None) -> dict:
    ckpt = out / "checkpoints"
    name = (ckpt / "latest").read_text().strip() if step is None else f"step_{step:07d}.pt"
    return torch.load(ckpt / name, map_location="cpu", weights_only=True)


def max_param_difference(a: dict, b: dict) -> float:
    return max(
        float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()
    )


# The interpreter below is a test's, written into its temporary directory: production code
# keeps no test hooks. It makes rank 0's checkpoint write slow, as a large model's is on a
# shared file system, so that a launcher that kills the job once another rank has exited
# would catch rank 0 in the middle of the write.
_SLOW_CHECKPOINT_PYTHON = '''#!{python}
"""{python}, except that ``launch/train.py`` runs with a DDP checkpoint write that first
sleeps {seconds} s while the run has no checkpoint yet (its first one: the preemption's in
the tests; a resumed run then saves at full speed). Written by tests/engine/engine_helpers.py;
usable as torchrun's script and as the PYTHON of the Slurm scripts."""
import os
import runpy
import sys
import time
from pathlib import Path

if len(sys.argv) < 2 or Path(sys.argv[1]).name != "train.py":  # config_value.py, -c ...
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])

import pipeline.engine.strategy as strategy  # noqa: E402

write = strategy.save_file_checkpoint  # DDPStrategy.save calls it by this name


def slow_write(ckpt_dir, step, *args, **kwargs):
    if not (Path(ckpt_dir) / "latest").exists():
        rank = os.environ.get("RANK", "0")
        print(f"slow checkpoint write: rank {{rank}} sleeps {seconds} s before writing step "
              f"{{step}}", file=sys.stderr, flush=True)
        time.sleep({seconds})
    return write(ckpt_dir, step, *args, **kwargs)


strategy.save_file_checkpoint = slow_write
script = sys.argv[1]
sys.path.insert(0, str(Path(script).resolve().parent))
sys.exit(runpy.run_path(script, run_name="train_under_test")["main"](sys.argv[2:]))
'''


def slow_checkpoint_python(directory: Path, seconds: float) -> Path:
    """An executable that runs Python scripts like this interpreter, but runs
    ``launch/train.py``'s ``main`` with rank 0's first checkpoint write ``seconds`` slower."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "slow_checkpoint_python"
    path.write_text(_SLOW_CHECKPOINT_PYTHON.format(python=sys.executable, seconds=seconds))
    path.chmod(0o755)
    return path
