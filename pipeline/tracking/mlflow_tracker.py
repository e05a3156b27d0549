"""MLflow tracking for every stage, written so that tracking can never break a run.

One ``Tracker`` is one MLflow run of one stage (shards, train or eval). Only the process
that owns it talks to MLflow (global rank 0; the others get ``enabled=False``), because
SQLite with several writers locks. Every MLflow call goes through ``_call``: the first
failure (server down, network gone, store locked) logs ONE warning and switches the
tracker off, and the stage goes on. Everything a run produces lives in its run
directory first; MLflow receives copies.

The run id is kept in ``RUN_DIR/run.json`` so that a resumed or requeued job continues
the same MLflow run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

RUN_FILE = "run.json"
# MLflow retries a failed HTTP request 7 times with exponential back-off by default, which
# stalls a training step for minutes when the server is gone. Fail fast instead; a user
# who wants more patience sets these variables themselves.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
_BATCH = 100  # MLflow's limit on params per log_batch call


def resolve_tracking_uri(uri: str, run_dir: str | Path) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the run dir.

    MLflow 3 refuses a plain ``./mlruns`` file store, so the default is SQLite.
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}``, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit the code runs from, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class Tracker:
    """One MLflow run of one stage, fail-soft. A disabled tracker does nothing at all."""

    def __init__(
        self,
        *,
        run_dir: str | Path,
        stage: str,
        uri: str = "",
        experiment: str = "maskrcnn",
        run_name: str = "",
        enabled: bool = True,
        resume: bool = True,
        tags: Mapping[str, str] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None
        if not enabled:
            return
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_tracking_uri(uri, self.run_dir)
        all_tags = {"stage": stage, "git_commit": git_commit(), "host": socket.gethostname()}
        all_tags.update(tags or {})
        self._call(lambda: self._start(experiment, run_name or stage, all_tags, resume))

    # --- the run ---------------------------------------------------------------------

    def _start(self, experiment: str, run_name: str, tags: dict[str, str], resume: bool):
        from mlflow.tracking import MlflowClient  # imported lazily: slow, and rank>0 skips it

        self._client = MlflowClient(tracking_uri=self.uri)
        previous = self._read_run_file() if resume else None
        if previous and previous.get("uri") == self.uri:
            run = self._client.get_run(previous["run_id"])
            self.run_id = run.info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
            self._client.set_tag(self.run_id, "resumed", "true")
            logger.info("tracking: continuing MLflow run %s at %s", self.run_id, self.uri)
            return
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # With a local SQLite store, keep artifacts beside it instead of in ./mlruns of
            # whatever directory the job was started from.
            location = None
            if self.uri.startswith("sqlite:"):
                location = (self.run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self._client.create_experiment(experiment, artifact_location=location)
        run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._write_run_file()
        logger.info("tracking: MLflow run %s at %s", self.run_id, self.uri)

    def _read_run_file(self) -> dict | None:
        path = self.run_dir / RUN_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("tracking: %s is not valid JSON; starting a new MLflow run", path)
            return None

    def _write_run_file(self):
        record = {"run_id": self.run_id, "uri": self.uri, "stage": self.stage}
        tmp = self.run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.run_dir / RUN_FILE)

    def _call(self, fn: Callable[[], T]) -> T | None:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as exc:  # any MLflow or network failure: warn once, carry on
            self.enabled = False
            reason = " ".join(str(exc).split())[:300]
            logger.warning(
                "tracking: MLflow at %s failed (%s: %s); the %s stage goes on without it, "
                "and its outputs stay in %s",
                getattr(self, "uri", "?"),
                type(exc).__name__,
                reason,
                self.stage,
                self.run_dir,
            )
            return None

    # --- logging ---------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]):
        """Log a (nested) mapping as flattened dotted params, e.g. the resolved config."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            self._call(lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int):
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, Any]):
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self._client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        self._call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def close(self, status: str = "FINISHED"):
        """End the run: FINISHED, FAILED or KILLED (a preempted job that will resume)."""
        self._call(lambda: self._client.set_terminated(self.run_id, status=status))
        self.enabled = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FINISHED" if exc_type is None else "FAILED")


def build_tracker(cfg, *, stage: str, run_dir: str | Path, rank: int = 0) -> Tracker:
    """Map ``cfg.tracking`` to a ``Tracker``; only global rank 0 gets an enabled one."""
    tracking = cfg.tracking
    return Tracker(
        run_dir=run_dir,
        stage=stage,
        uri=tracking.uri,
        experiment=tracking.experiment,
        run_name=tracking.run_name,
        enabled=tracking.enabled and rank == 0,
    )
