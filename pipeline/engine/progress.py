"""Progress of a training run: the line printed every ``log_every`` steps, the metrics sent
to MLflow, ``metrics.jsonl`` in the run directory, and the loss-curve picture.

Losses are averaged over the interval and over the ranks (one all-reduce per log line, not
per step); they are summed on their device and read by the host on logging steps only.
Images/s counts the global batch. The data-wait share is the part of rank 0's wall time spent
waiting for the loader: near 0 means the model is the bottleneck.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from pipeline.collectives import sum_across_ranks

log = logging.getLogger("pipeline.train")

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressMeter:
    """Accumulates one log interval and turns it into a line and a metrics dict."""

    def __init__(self, *, max_steps: int, global_batch: int):
        self.max_steps, self.global_batch = max_steps, global_batch
        self._reset()

    def _reset(self):
        # Sums kept on the losses' device: a micro-batch adds without a host read; report()
        # reads them all at once, on logging steps only.
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            value = value.detach().to(torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro_batches += 1

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def step_done(self) -> None:
        self.steps += 1

    def report(self, step: int, lr: float, grad_norm: float) -> tuple[str, dict[str, float]]:
        """(the progress line, the metrics), averaged over ranks; resets the interval."""
        names = sorted(self.sums)
        sums = torch.stack([self.sums[n] for n in names]).tolist() if names else []
        values = sum_across_ranks([*sums, self.micro_batches])
        count = max(1.0, values[-1])
        losses = {name: float(values[i]) / count for i, name in enumerate(names)}
        elapsed = max(1e-9, time.perf_counter() - self.started)
        images_per_s = self.steps * self.global_batch / elapsed
        step_time = elapsed / max(1, self.steps)
        metrics = {
            **{f"loss/{name}": value for name, value in losses.items()},
            "loss/total": sum(losses.values()),
            "lr": lr,
            "images_per_s": images_per_s,
            "data_wait_share": self.data_wait / elapsed,
        }
        if math.isfinite(grad_norm):
            metrics["grad_norm"] = grad_norm
        eta = step_time * (self.max_steps - step)
        parts = " ".join(f"{name}={value:.4f}" for name, value in losses.items())
        line = (
            f"step {step}/{self.max_steps} loss={metrics['loss/total']:.4f} {parts} "
            f"lr={lr:.5g} images/s={images_per_s:.1f} "
            f"data_wait={100 * metrics['data_wait_share']:.0f}% eta={format_duration(eta)}"
        )
        self._reset()
        return line, metrics


def append_metrics(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop the lines of steps after ``last_step``: a run that died after its last checkpoint
    logged steps that the resumed run will log again. A crash in the middle of
    ``append_metrics`` leaves a last line without its end: it is dropped with a warning (so is
    any other line that does not parse: the log must not stop a resume). The file is replaced
    by rename, so a crash here leaves the old one."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # not JSON, not a record, no step
            bad.append(number)
    if bad == [len(lines)]:
        log.warning("%s: dropped its last line, torn by a crash in mid-write", path)
    elif bad:
        log.warning("%s: dropped %d lines that do not parse (lines %s)", path, len(bad), bad[:5])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def plot_loss_curve(run_dir: Path) -> Path | None:
    """``loss_curve.png`` of every ``loss/*`` metric against the step; None without data."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({key for record in records for key in record if key.startswith("loss/")})
    figure, axis = plt.subplots(figsize=(8, 5))
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        axis.plot(
            *zip(*points, strict=True),
            label=name.removeprefix("loss/"),
            linewidth=2.0 if name == "loss/total" else 1.0,
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out = run_dir / CURVE_FILE
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
