"""What tracking costs the training loop per logged step: ``Tracker.log_metrics`` with one
step's metrics (the ten the loop logs: five losses, their total, lr, images/s, data-wait
share, gradient norm), which appends one line to the run directory's spool (one
``os.write``, in the kernel when the call returns) and returns.

    python benchmarks/tracking.py             # 20 000 calls per configuration
    python benchmarks/tracking.py --quick     # 2 000

Configurations, each a fresh Tracker in a temporary run directory:
- server away: the tracking URI refuses connections (the sender only retries);
- delivering: a local SQLite store that the sender thread fills while the loop logs (the
  two share the interpreter, so this includes the contention with the sender).

Figures: per-call wall time (``perf_counter_ns`` around the call) over all calls, median,
99th percentile and max in µs, and the spool's bytes per step. The machine may be shared:
the figures are as noisy as its load. The last line printed is a JSON object of them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.tracking import Tracker

LOSSES = ("box_reg", "classifier", "mask", "objectness", "rpn_box_reg")
KEYS = [f"loss/loss_{name}" for name in LOSSES]
KEYS += ["loss/total", "lr", "images_per_s", "data_wait_share", "grad_norm"]


def refused_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def measure(uri_for, calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        tracker = Tracker(run_dir=run_dir, stage="train", uri=uri_for(run_dir), start_timeout=5)
        durations = []
        for step in range(1, calls + 1):
            metrics = {key: math.sin(step + i) for i, key in enumerate(KEYS)}
            start = time.perf_counter_ns()
            tracker.log_metrics(metrics, step=step, once=True)
            durations.append((time.perf_counter_ns() - start) / 1000)
        spool_bytes = os.path.getsize(run_dir / "mlflow-spool.jsonl")
        tracker.close(timeout=60)
    durations.sort()
    return {
        "median_us": round(statistics.median(durations), 2),
        "p99_us": round(durations[int(0.99 * (len(durations) - 1))], 2),
        "max_us": round(durations[-1], 2),
        "bytes_per_step": round(spool_bytes / calls, 1),
        "calls": calls,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 000 calls per configuration")
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args(argv)
    calls = 2_000 if args.quick else args.calls
    logging.basicConfig(level=logging.ERROR)  # the outage warnings are expected here
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    configurations = {
        "server away": lambda run_dir: refused_uri(),
        "delivering to SQLite": lambda run_dir: f"sqlite:///{run_dir.resolve()}/mlflow.db",
    }
    figures = {}
    print(f"log_metrics with one step's {len(KEYS)} metrics, {calls} calls each")
    print(f"{'configuration':<24}{'median µs':>11}{'p99 µs':>10}{'max µs':>10}{'bytes/step':>12}")
    for name, uri_for in configurations.items():
        figures[name] = measure(uri_for, calls)
        f = figures[name]
        print(f"{name:<24}{f['median_us']:>11}{f['p99_us']:>10}{f['max_us']:>10}"
              f"{f['bytes_per_step']:>12}")  # fmt: skip
    print(json.dumps({"metrics_per_step": len(KEYS), "configurations": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
