"""System metrics (CPU, memory, disk, network, GPU) sampled into a Tracker's queue.

MLflow's own ``SystemMetricsMonitor`` is not used as a whole: it needs the run id when it
starts (a run may not exist yet when the server is away), it asks the server for the run
at every sample, and at the first failure it logs a warning and stops for good. Its metric
collectors (``mlflow.system_metrics.metrics``, psutil and, if installed, pynvml) are fine,
so this thread samples them and logs through ``Tracker.log_metrics``, which queues and
retries like any other metric. Names are MLflow's: ``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``, ...
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

PREFIX = "system/"


def _collectors() -> list:
    """MLflow's CPU/memory, disk and network collectors, plus GPU where pynvml works."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    collectors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        collectors.append(GPUMonitor())
    except Exception:  # no pynvml, no NVIDIA driver or no GPU: skip GPU metrics
        logger.debug("tracking: no GPU system metrics", exc_info=True)
    return collectors


class SystemMetricsSampler:
    """Calls ``log(metrics, step)`` every ``interval`` s from a daemon thread until stopped."""

    def __init__(self, log: Callable[[dict[str, float], int], None], interval: float = 10.0):
        self._log = log
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self, collectors: list) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for collector in collectors:
            try:
                collector.collect_metrics()
                metrics.update(collector.aggregate_metrics())
            except Exception:  # one broken collector must not end the others
                logger.debug("tracking: system metric collector failed", exc_info=True)
            collector.clear_metrics()
        return {PREFIX + key: float(value) for key, value in metrics.items()}

    def _run(self):
        try:
            collectors = _collectors()
        except ImportError as exc:
            logger.warning("tracking: no system metrics (%s); they need psutil", exc)
            return
        self.sample(collectors)  # the first CPU percentage is meaningless (no interval yet)
        step = 0
        while not self._stop.wait(self._interval):
            self._log(self.sample(collectors), step)
            step += 1
