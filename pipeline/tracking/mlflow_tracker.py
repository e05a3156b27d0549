"""MLflow tracking for every stage, written so that tracking never loses data and never
blocks (or breaks) a run.

One ``Tracker`` is one stage's view of one MLflow run. Only the process that owns it talks
to MLflow (global rank 0; the others get ``enabled=False`` and do nothing), because SQLite
with several writers locks. The log calls only queue their records; a background thread
(``sender.Sender``) opens the run and delivers them, retrying while the server is away, so
a training step never waits on the network and nothing is lost across an outage (up to a
bound on queued metric points). ``close`` waits a bounded time for the queue to drain.
Everything a run produces lives in its run directory first; MLflow receives copies.

The run id is kept in ``RUN_DIR/run.json`` (``{"run_id", "uri", "stage"}``) so that a
resumed or requeued job continues the same MLflow run instead of starting a new one; the
eval stage instead attaches to the training run that made its checkpoint (``run_id=``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .sender import Sender
from .system_metrics import SystemMetricsSampler

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# MLflow retries a failed HTTP request 7 times with exponential back-off by default, which
# hides an outage for minutes and makes close() wait on one request. Fail fast instead: the
# sender retries on its own schedule. A user who wants more patience sets these variables.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


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
    """One stage's MLflow run: queue-and-forget logging, see the module doc.

    Args:
        run_dir: the stage's output directory; holds run.json (and the default SQLite store).
        stage: "shards", "train" or "eval"; tagged on a new run and named in messages.
        uri: tracking URI (see ``resolve_tracking_uri``).
        experiment, run_name: where a new run goes and what it is called (default: stage).
        enabled: False makes every call a no-op (ranks other than 0).
        resume: continue the run recorded in ``run_dir/run.json`` if its URI is ``uri``.
        tags: extra tags, set on the run whether it is new, resumed or attached.
        run_id: attach to this existing run (e.g. the training run of a checkpoint) instead
            of creating one. An attached run is logged into but never ended by ``close``.
        system_metrics: sample CPU, memory, disk, network (and GPU, if pynvml is installed)
            every ``system_metrics_interval`` s as ``system/...`` metrics.
        close_timeout: how long ``close`` (and ``flush`` by default) waits for delivery.
        start_timeout: how long the constructor waits for the first try to open the run,
            so that ``run_id`` is known at once when the server is up.
        max_queued_metrics: metric points kept while MLflow is away; the oldest go first.
    """

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
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
        close_timeout: float = 60.0,
        start_timeout: float = 10.0,
        max_queued_metrics: int = 1_000_000,
    ):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self._active = enabled  # until close()
        self.close_timeout = close_timeout
        self.uri: str | None = None
        self._sender: Sender | None = None
        self._sampler: SystemMetricsSampler | None = None
        self._warned_values: set[str] = set()
        if not enabled:
            return
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_tracking_uri(uri, self.run_dir)
        self._experiment = experiment
        self._run_name = run_name or stage
        self._extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._attach_id = run_id
        previous = None
        if run_id is None and resume:
            previous = self._read_run_file()
            if previous and previous.get("uri") != self.uri:
                previous = None
        self._resume_id = previous.get("run_id") if previous else None
        self._sender = Sender(
            uri=self.uri,
            run_dir=self.run_dir,
            stage=stage,
            open_run=self._open_run,
            run_id=run_id or self._resume_id,
            max_queued_metrics=max_queued_metrics,
        )
        self._sender.first_attempt.wait(start_timeout)
        if system_metrics:
            self._sampler = SystemMetricsSampler(self.log_metrics, system_metrics_interval)
        # Records still queued when the process ends without close() (a crash, an attached
        # tracker left open) are delivered at exit, within close_timeout.
        atexit.register(self._deliver_at_exit)

    @property
    def enabled(self) -> bool:
        """Logging goes somewhere: tracking on, not closed, and the run not refused (an
        attached or resumed run id that MLflow does not know)."""
        return self._active and not self._sender.dead

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while a new run waits to be created (server away)."""
        return self._sender.run_id if self._sender else None

    # --- opening the run (on the sender's thread; errors there are retried) --------------

    def _open_run(self, client) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        if self._attach_id:
            run_id = client.get_run(self._attach_id).info.run_id  # 404 if there is none
            if self._extra_tags:
                client.log_batch(run_id, tags=_run_tags(self._extra_tags), synchronous=True)
            self._write_run_file(run_id)
            logger.info("tracking: logging into MLflow run %s at %s", run_id, self.uri)
            return run_id
        if self._resume_id:
            try:
                run = client.get_run(self._resume_id)
                run_id = run.info.run_id
                if run.info.lifecycle_stage == "deleted":
                    raise MlflowException("deleted", error_code=RESOURCE_DOES_NOT_EXIST)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning(
                    "tracking: MLflow run %s of %s is gone; starting a new one",
                    self._resume_id,
                    self.run_dir / RUN_FILE,
                )
                self._resume_id = None
            else:
                client.update_run(run_id, status="RUNNING")
                tags = {**self._extra_tags, "resumed": "true"}
                client.log_batch(run_id, tags=_run_tags(tags), synchronous=True)
                logger.info("tracking: continuing MLflow run %s at %s", run_id, self.uri)
                return run_id
        tags = {"stage": self.stage, "git_commit": git_commit(), "host": socket.gethostname()}
        tags.update(self._extra_tags)
        experiment_id = self._experiment_id(client)
        run_id = client.create_run(experiment_id, run_name=self._run_name, tags=tags).info.run_id
        self._write_run_file(run_id)
        logger.info("tracking: MLflow run %s at %s", run_id, self.uri)
        return run_id

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self._experiment)
        if found is not None:
            return found.experiment_id
        # With a local SQLite store, keep artifacts beside it instead of in ./mlruns of
        # whatever directory the job was started from.
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.run_dir / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(self._experiment, artifact_location=location)
        except MlflowException as exc:  # another job created it just now
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self._experiment).experiment_id

    def _read_run_file(self) -> dict | None:
        path = self.run_dir / RUN_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("tracking: %s is not valid JSON; starting a new MLflow run", path)
            return None

    def _write_run_file(self, run_id: str):
        previous = self._read_run_file() if (self.run_dir / RUN_FILE).exists() else None
        if previous and (previous.get("run_id"), previous.get("uri")) == (run_id, self.uri):
            return  # e.g. eval attached in the training dir: keep its "stage": "train"
        record = {"run_id": run_id, "uri": self.uri, "stage": self.stage}
        tmp = self.run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.run_dir / RUN_FILE)

    # --- logging: each call only queues (microseconds) ------------------------------------

    def log_params(self, params: Mapping[str, Any]):
        """Log a (nested) mapping as flattened dotted params, e.g. the resolved config."""
        if self._active:
            self._sender.add_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int):
        """Queue ``{name: number}`` at ``step``, timestamped now; a non-number is skipped."""
        if not self._active:
            return
        now = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                points.append((str(key), float(value), now, int(step)))
            except (TypeError, ValueError):
                if key not in self._warned_values:
                    self._warned_values.add(key)
                    logger.warning("tracking: metric %r = %r is not a number; skipped", key, value)
        self._sender.add_metrics(points)

    def set_tags(self, tags: Mapping[str, Any]):
        if self._active:
            self._sender.add_tags({str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        """Upload the file (or directory) at ``path`` into ``artifact_path`` of the run.

        The file is read when the upload happens, which may be later (server away): log
        files that are final, or copy a file that will still change and log the copy.
        """
        if self._active:
            self._sender.add_artifact(str(Path(path).resolve()), artifact_path)

    def pending(self) -> int:
        """How many records (and the run itself, until created) wait to be delivered."""
        return sum(self._sender.pending().values()) if self._sender else 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is delivered (at most ``timeout``, default
        ``close_timeout`` s); True if it was. Training does not need to call this."""
        if not self._active:
            return True
        return self._sender.flush(self.close_timeout if timeout is None else timeout)

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """End the run (FINISHED, FAILED, or KILLED for a preempted job that will resume)
        after delivering what is queued, waiting at most ``timeout`` (default
        ``close_timeout``) s; then give up with one warning. True if all was delivered."""
        if not self._active:
            return True
        self._active = False
        atexit.unregister(self._deliver_at_exit)
        if self._sampler is not None:
            self._sampler.stop()
        if not self._attach_id:  # an attached run belongs to another stage, which ends it
            self._sender.end(status)
        return self._sender.close(self.close_timeout if timeout is None else timeout)

    def _deliver_at_exit(self):
        if self._active:
            self._active = False
            if self._sampler is not None:
                self._sampler.stop()
            self._sender.close(self.close_timeout)  # the run's status is left as it is

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FINISHED" if exc_type is None else "FAILED")


def _run_tags(tags: Mapping[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def build_tracker(
    cfg,
    *,
    stage: str,
    run_dir: str | Path,
    rank: int = 0,
    run_id: str | None = None,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Tracker:
    """Map ``cfg.tracking`` to a ``Tracker``; only global rank 0 gets an enabled one.

    ``run_id`` and ``uri`` attach to an existing run (eval: from the checkpoint's
    ``"tracking"`` entry); a ``uri`` of None or "" falls back to ``cfg.tracking.uri``.
    """
    tracking = cfg.tracking
    return Tracker(
        run_dir=run_dir,
        stage=stage,
        uri=uri or tracking.uri,
        experiment=tracking.experiment,
        run_name=tracking.run_name,
        enabled=tracking.enabled and rank == 0,
        tags=tags,
        run_id=run_id,
        system_metrics=tracking.system_metrics,
        close_timeout=tracking.close_timeout,
    )
