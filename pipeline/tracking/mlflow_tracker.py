"""MLflow tracking for every stage, written so that tracking never loses data and never
blocks (or breaks) a run.

One ``Tracker`` is one stage's view of one MLflow run. Only the process that owns it talks
to MLflow (global rank 0; the others get ``enabled=False`` and do nothing), because SQLite
with several writers locks. A log call appends its record to the run directory's spool
(``spool.py``: one write, microseconds) and returns; background threads (``sender.py``)
open the run as soon as a server answers and deliver the spool from there, retrying while
the server is away. Nothing waits in memory: what was not delivered when a process ends
(``close`` gave up after ``close_timeout``, a crash, a SIGKILL) is sent by the next Tracker
that opens the run directory: a resumed or requeued job, the next evaluation of a --watch.

The spool also knows which MLflow run a run directory logs into, before MLflow has created
it: a resumed job continues the run of the job before it (created by whichever of them
reached a server first, with the params and tags that were meant for it). Its id is in
``RUN_DIR/run.json`` (``{"run_id", "uri", "stage"}``) once known; the eval stage instead
attaches to the training run that made its checkpoint (``run_id=``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .sender import Sender
from .spool import SPOOL_FILE, SpoolWriter, scan
from .state import DeliveryState
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


def recorded_run(run_dir: str | Path | None, uri: str | None) -> str | None:
    """The run id in ``run_dir/run.json`` if it is a run at ``uri``, else None: how an
    evaluation finds the training run of a checkpoint saved before MLflow created it."""
    if not (run_dir and uri):
        return None
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("uri") != uri:
        return None
    return record.get("run_id") or None


class Tracker:
    """One stage's MLflow run: spool-and-forget logging, see the module doc.

    Args:
        run_dir: the stage's output directory; holds the spool, run.json (and the default
            SQLite store).
        stage: "shards", "train" or "eval"; tagged on a new run and named in messages.
        uri: tracking URI (see ``resolve_tracking_uri``).
        experiment, run_name: where a new run goes and what it is called (default: stage).
        enabled: False makes every call a no-op (ranks other than 0) and writes nothing.
        resume: continue the run that ``run_dir`` last logged into at ``uri`` (its spool,
            else a run.json written before there was one).
        tags: extra tags, set on the run whether it is new, resumed or attached.
        run_id: attach to this existing run (e.g. the training run of a checkpoint) instead
            of creating one. An attached run is logged into but never ended by ``close``.
        system_metrics: sample CPU, memory, disk, network (and GPU, if pynvml is installed)
            every ``system_metrics_interval`` s as ``system/...`` metrics.
        close_timeout: how long ``close`` (and ``flush`` by default) waits for delivery.
        start_timeout: how long the constructor waits for the first try to open the run,
            so that ``run_id`` is known at once when the server is up.
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
    ):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self._active = enabled  # until close()
        self.close_timeout = close_timeout
        self.uri: str | None = None
        self._sender: Sender | None = None
        self._writer: SpoolWriter | None = None
        self._sampler: SystemMetricsSampler | None = None
        self._warned_values: set[str] = set()
        self._once_steps: dict[str, int] = {}  # key -> last step an earlier attempt logged
        self._said_once = self._write_failed = False
        if not enabled:
            return
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.uri = resolve_tracking_uri(uri, self.run_dir)
        self._attached = run_id is not None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            found = scan(self.run_dir / SPOOL_FILE)
            session = self._session(found, resume, run_id, experiment, run_name, tags or {})
            self._writer = SpoolWriter(self.run_dir / SPOOL_FILE)
            self._writer.append(session)
        except OSError as exc:  # tracking never stops a run
            logger.warning("tracking: cannot write to %s (%s); the %s stage goes on without "
                           "tracking", self.run_dir, exc, stage)  # fmt: skip
            self._active = False
            return
        self._q = session["q"]
        found.sessions[self._q] = session
        self._sender = Sender(
            uri=self.uri,
            run_dir=self.run_dir,
            stage=stage,
            own=session,
            sessions=found.sessions,
            on_run=self._write_run_file,
        )
        self._sender.first_attempt.wait(start_timeout)
        if system_metrics:
            self._sampler = SystemMetricsSampler(self.log_metrics, system_metrics_interval)
        # Without close() (a crash, an attached tracker left open) the spool is delivered at
        # exit, within close_timeout; what is left is sent by the next Tracker of run_dir.
        atexit.register(self._deliver_at_exit)

    def _session(self, found, resume: bool, run_id, experiment, run_name, tags) -> dict:
        """This process's session record: which run it logs into, and how to create it."""
        tags = {str(k): str(v) for k, v in tags.items()}
        session = {"k": "session", "q": uuid.uuid4().hex[:12], "local": uuid.uuid4().hex,
                   "uri": self.uri, "stage": self.stage, "experiment": experiment,
                   "run_name": run_name or self.stage, "tags": tags, "run_id": run_id,
                   "attach": run_id is not None, "resumed": False, "pid": os.getpid(),
                   "time": round(time.time(), 3)}  # fmt: skip
        if run_id is not None:
            return session
        session["create_tags"] = {
            "stage": self.stage, "git_commit": git_commit(), "host": socket.gethostname(), **tags
        }  # fmt: skip
        previous = found.last_session(self.uri) if resume else None
        if previous is not None:  # the same run, created or not
            local = previous["local"]
            known = DeliveryState(self.run_dir).runs.get(local)
            self._once_steps = found.once_steps.get(local, {})
            session.update(local=local, run_id=known or found.known_run_id(local), resumed=True)
        elif resume and not found.sessions:  # a run directory from before the spool
            record = self._read_run_file()
            if record and record.get("uri") == self.uri and record.get("run_id"):
                session.update(run_id=record["run_id"], resumed=True)
        return session

    @property
    def enabled(self) -> bool:
        """Logging goes somewhere: tracking on, not closed, and the run not refused (an
        attached run id that MLflow does not know)."""
        return self._active and not self._sender.own_dead  # not active without a sender

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while a new run waits to be created (server away)."""
        return self._sender.run_id if self._sender else None

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

    # --- logging: each call appends one line to the spool (microseconds) ------------------

    def _append(self, record: dict[str, Any]):
        record["q"] = self._q
        try:
            self._writer.append(record)
        except OSError as exc:  # a full disk: training goes on, tracking loses the record
            if not self._write_failed:
                self._write_failed = True
                logger.warning("tracking: cannot write to %s (%s); records are lost until it "
                               "can", self._writer.path, exc)  # fmt: skip

    def log_params(self, params: Mapping[str, Any]):
        """Log a (nested) mapping as flattened dotted params, e.g. the resolved config."""
        if self._active:
            self._append({"k": "params", "p": flatten(params)})

    def log_metrics(self, metrics: Mapping[str, Any], step: int, *, once: bool = False):
        """Log ``{name: number}`` at ``step``, timestamped now; a non-number is skipped.

        ``once``: a step's metrics go to the run once. A resumed job runs again the steps
        between its checkpoint and where the job before it stopped; those that job logged
        (with ``once``) are not logged again, and the run keeps the first values."""
        if not self._active:
            return
        step = int(step)
        values: dict[str, float] = {}
        for key, value in metrics.items():
            key = str(key)
            if once and step <= self._once_steps.get(key, step - 1):
                self._say_once(step)
                continue
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                if key not in self._warned_values:
                    self._warned_values.add(key)
                    logger.warning("tracking: metric %r = %r is not a number; skipped", key, value)
        if values:
            record: dict[str, Any] = {"k": "metrics", "o": 1} if once else {"k": "metrics"}
            record.update(s=step, ts=int(time.time() * 1000), m=values)
            self._append(record)

    def _say_once(self, step: int):
        if not self._said_once:
            self._said_once = True
            logger.info("tracking: step %d and the steps before it that an earlier attempt of "
                        "this run logged are not logged again", step)  # fmt: skip

    def set_tags(self, tags: Mapping[str, Any]):
        if self._active:
            self._append({"k": "tags", "t": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        """Upload the file (or directory) at ``path`` into ``artifact_path`` of the run.

        The file is read when the upload happens, which may be later (server away, or a
        later job): log files that are final, or copy a file that will still change."""
        if self._active:
            self._append({"k": "artifact", "path": str(Path(path).resolve()),
                          "dir": artifact_path})  # fmt: skip

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged is delivered (at most ``timeout``, default
        ``close_timeout`` s); True if it was. Training does not need to call this."""
        if not self._active:
            return True
        timeout = self.close_timeout if timeout is None else timeout
        return self._sender.flush(timeout, self._writer.size())

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """End the run (FINISHED, FAILED, or KILLED for a preempted job that will resume)
        and wait at most ``timeout`` (default ``close_timeout``) s for delivery; then give
        up with one warning (the rest stays in the spool). True if all was delivered. The
        end status goes out in order with the metrics, never behind an artifact upload."""
        if not self._active:
            return True
        self._active = False
        atexit.unregister(self._deliver_at_exit)
        if self._sampler is not None:
            self._sampler.stop()
        if not self._attached:  # an attached run belongs to another stage, which ends it
            self._append({"k": "end", "status": status})
        timeout = self.close_timeout if timeout is None else timeout
        delivered = self._sender.close(timeout, self._writer.size())
        self._writer.close()
        return delivered

    def _deliver_at_exit(self):
        if self._active:
            self._active = False
            if self._sampler is not None:
                self._sampler.stop()
            self._sender.close(self.close_timeout, self._writer.size())  # status left as is
            self._writer.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close("FINISHED")
        else:  # Ctrl-C is a kill, as MLflow's own fluent API has it
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def build_tracker(
    cfg,
    *,
    stage: str,
    run_dir: str | Path,
    rank: int = 0,
    run_id: str | None = None,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    resume: bool = True,
) -> Tracker:
    """Map ``cfg.tracking`` to a ``Tracker``; only global rank 0 gets an enabled one.

    ``run_id`` and ``uri`` attach to an existing run (eval: from the checkpoint's
    ``"tracking"`` entry); a ``uri`` of None or "" falls back to ``cfg.tracking.uri``.
    ``resume=False``: a new run even if ``run_dir`` logged into one before.
    """
    tracking = cfg.tracking
    return Tracker(
        run_dir=run_dir,
        stage=stage,
        uri=uri or tracking.uri,
        experiment=tracking.experiment,
        run_name=tracking.run_name,
        enabled=tracking.enabled and rank == 0,
        resume=resume,
        tags=tags,
        run_id=run_id,
        system_metrics=tracking.system_metrics,
        close_timeout=tracking.close_timeout,
    )
