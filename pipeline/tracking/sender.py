"""The background thread that delivers a Tracker's records to MLflow.

Training must never wait on MLflow, and nothing may be lost while the server is away. So
the Tracker's log calls only append to the in-memory queues here (a lock, an append, a
notify: microseconds), and one daemon thread does every MLflow call:

- It first opens the run (``open_run``: create, resume or attach), then sends params, tags
  and metrics in ``log_batch`` calls of at most MLflow's limits, then artifacts, and at
  close the run's end status.
- An error a retry can fix (connection refused, timeout, HTTP 5xx, a locked SQLite file)
  puts the batch back at the head of its queue and retries with back-off (1 s doubling to
  30 s; 1 s while someone waits in ``flush``). The first such error logs ONE warning; the
  first success after it logs ONE "back" warning. An error a retry cannot fix (HTTP 4xx: a
  rejected value, a missing run) drops the batch's items, one by one so that a single bad
  item does not take its neighbours with it, with one warning per key.
- Queued metric points are bounded (``max_queued_metrics``); beyond that the oldest are
  dropped, announced by one warning, and their number is reported when MLflow is back or
  the run ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# MLflow's limits on one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
RETRY_WHILE_FLUSHING_S = 1.0
# After being woken by new records, wait this long so that a few steps share one batch.
LINGER_S = 0.2

MetricPoint = tuple[str, float, int, int]  # key, value, timestamp (ms), step
THREAD_NAME = "mlflow-sender"


def _not_from_sender(record: logging.LogRecord) -> bool:
    return record.threadName != THREAD_NAME


def is_permanent(exc: BaseException) -> bool:
    """True for errors that no retry can fix: HTTP 4xx (except timeout / rate limit)."""
    if isinstance(exc, (FileNotFoundError, ImportError)):  # an artifact gone; no mlflow
        return True
    status = None
    if callable(getattr(exc, "get_http_status_code", None)):  # MlflowException
        status = exc.get_http_status_code()
    elif getattr(exc, "response", None) is not None:  # requests.HTTPError (artifact upload)
        status = getattr(exc.response, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


class Sender:
    """Queues a run's records and delivers them from a daemon thread; see the module doc."""

    def __init__(
        self,
        *,
        uri: str,
        run_dir: Path,
        stage: str,
        open_run: Callable[[Any], str],
        run_id: str | None = None,
        max_queued_metrics: int = 1_000_000,
    ):
        self.uri, self.run_dir, self.stage = uri, run_dir, stage
        self.run_id = run_id  # known up front when attaching or resuming; else set by open_run
        self._open_run = open_run
        self._max_metrics = max_queued_metrics
        self._cond = threading.Condition()
        self._metrics: deque[MetricPoint] = deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: deque[tuple[str, str | None]] = deque()
        self._singles: deque[tuple[str, Any]] = deque()  # items of a rejected batch
        self._end_status: str | None = None
        self._inflight: tuple[str, Any] | None = None
        self._opened = False
        self._dead = False  # the run could not be opened for good: drop everything
        self._stopping = False
        self._abandoned = False
        self._flush_waiters = 0
        self._down_since: float | None = None
        self._dropped = 0  # metric points dropped since last reported
        self._warned_keys: set[tuple[str, str]] = set()
        self._client = None
        self.first_attempt = threading.Event()  # the first try to open the run has ended
        # urllib3 warns at every retried request; while the server is away that would be one
        # warning per attempt from this thread, which reports the outage once by itself.
        retries = logging.getLogger("urllib3.connectionpool")
        if _not_from_sender not in retries.filters:
            retries.addFilter(_not_from_sender)
        self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)
        self._thread.start()

    # --- called by the Tracker (any thread; never blocks on MLflow) -------------------

    def add_metrics(self, points: list[MetricPoint]):
        with self._cond:
            if self._dead or self._stopping:
                return
            self._metrics.extend(points)
            self._trim_metrics()
            self._cond.notify()

    def add_params(self, params: dict[str, str]):
        self._add(self._params, params)

    def add_tags(self, tags: dict[str, str]):
        self._add(self._tags, tags)

    def add_artifact(self, path: str, artifact_path: str | None):
        with self._cond:
            if not (self._dead or self._stopping):
                self._artifacts.append((path, artifact_path))
                self._cond.notify()

    def end(self, status: str):
        with self._cond:
            if not (self._dead or self._stopping):
                self._end_status = status
                self._cond.notify()

    @property
    def dead(self) -> bool:
        """MLflow refused to open the run (e.g. an unknown run id): everything is dropped."""
        return self._dead

    def pending(self) -> dict[str, int]:
        """What has not been delivered yet, by kind (``run`` is 1 until the run is open)."""
        with self._cond:
            return self._counts()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until everything queued is delivered; True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()  # cut short a back-off wait
            try:
                while not self._idle() and not self._dead:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return not self._dead
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float) -> bool:
        """Flush for up to ``timeout`` s, then stop; warn once about what was not delivered."""
        delivered = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._abandoned = not delivered
            counts = self._counts()
            self._cond.notify_all()
        if delivered:
            self._thread.join(timeout=5)
        elif not self._dead:
            labels = {"metrics": "metric points", "params": "params", "tags": "tags"}
            lost = [f"{counts[k]} {label}" for k, label in labels.items() if counts[k]]
            lost += [f"{counts['artifacts']} artifacts"] if counts["artifacts"] else []
            lost += ["the run's end status"] if counts["end"] else []
            if self._dropped:
                lost.append(f"{self._dropped} older metric points dropped earlier")
            logger.warning(
                "tracking: gave up on MLflow at %s after %.0f s%s: not delivered: %s; the %s "
                "stage's outputs are in %s",
                self.uri,
                timeout,
                " (the run was never created)" if counts["run"] else "",
                ", ".join(lost) or "nothing else",
                self.stage,
                self.run_dir,
            )
        return delivered

    # --- bookkeeping (callers hold self._cond) ----------------------------------------

    def _add(self, queue: dict[str, str], items: dict[str, str]):
        with self._cond:
            if not (self._dead or self._stopping):
                queue.update(items)
                self._cond.notify()

    def _trim_metrics(self):
        over = len(self._metrics) - self._max_metrics
        if over <= 0:
            return
        for _ in range(over):
            self._metrics.popleft()
        if not self._dropped:
            logger.warning(
                "tracking: more than %d metric points are waiting for MLflow at %s; dropping "
                "the oldest (how many is reported when MLflow is back or the run ends)",
                self._max_metrics,
                self.uri,
            )
        self._dropped += over

    def _counts(self) -> dict[str, int]:
        counts = {
            "run": 0 if self._opened else 1,
            "metrics": len(self._metrics),
            "params": len(self._params),
            "tags": len(self._tags),
            "artifacts": len(self._artifacts),
            "end": int(self._end_status is not None),
        }
        for kind, payload in [*self._singles, *([self._inflight] if self._inflight else [])]:
            if kind != "open":
                counts[kind] += len(payload) if kind in ("metrics", "params", "tags") else 1
        return counts

    def _idle(self) -> bool:
        return self._inflight is None and not any(self._counts().values())

    def _take(self) -> tuple[str, Any] | None:
        """The next unit of work, highest priority first, or None if there is none."""
        if not self._opened:
            return ("open", None)
        if self._singles:
            kind, item = self._singles.popleft()
            return (kind, [item]) if kind in ("metrics", "params", "tags") else (kind, item)
        for kind, queue, limit in (
            ("params", self._params, MAX_PARAMS_PER_BATCH),
            ("tags", self._tags, MAX_TAGS_PER_BATCH),
        ):
            if queue:
                return kind, [(key, queue.pop(key)) for key in list(islice(queue, limit))]
        if self._metrics:
            n = min(len(self._metrics), MAX_METRICS_PER_BATCH)
            return "metrics", [self._metrics.popleft() for _ in range(n)]
        if self._artifacts:
            return "artifacts", self._artifacts.popleft()
        if self._end_status is not None:
            status, self._end_status = self._end_status, None
            return "end", status
        return None

    def _put_back(self, job: tuple[str, Any]):
        kind, payload = job
        if kind in ("params", "tags"):
            queue = self._params if kind == "params" else self._tags
            merged = {**dict(payload), **queue}  # a value logged since then wins
            queue.clear()
            queue.update(merged)
        elif kind == "metrics":
            self._metrics.extendleft(reversed(payload))
            self._trim_metrics()
        elif kind == "artifacts":
            self._artifacts.appendleft(payload)
        elif kind == "end" and self._end_status is None:
            self._end_status = payload

    # --- the worker thread -------------------------------------------------------------

    def _next_job(self) -> tuple[str, Any] | None:
        with self._cond:
            while not (self._abandoned or self._dead):
                job = self._take()
                if job is not None:
                    self._inflight = job
                    return job
                if self._stopping:
                    return None
                self._cond.wait()
                linger_until = time.monotonic() + LINGER_S
                while not (self._flush_waiters or self._stopping):
                    remaining = linger_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            return None

    def _work(self):
        delay = RETRY_MIN_S
        while (job := self._next_job()) is not None:
            try:
                self._do(job)
                error = None
            except Exception as exc:  # every failure is either retried or dropped
                error = exc
            if error is not None and not is_permanent(error):
                with self._cond:
                    self._put_back(job)
                    self._inflight = None
                    self._cond.notify_all()
                self._went_away(error)
                if job[0] == "open":
                    self.first_attempt.set()
                self._wait_to_retry(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            if error is not None:
                self._reject(job, error)
            if job[0] == "open":
                self.first_attempt.set()
            delay = RETRY_MIN_S
            self._reachable()
            with self._cond:
                self._inflight = None
                self._cond.notify_all()

    def _do(self, job: tuple[str, Any]):
        kind, payload = job
        if kind == "open":
            if self._client is None:
                from mlflow.tracking import MlflowClient  # slow import: here, not in training

                self._client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._open_run(self._client)
            with self._cond:
                self._opened = True
            return
        from mlflow.entities import Metric, Param, RunTag

        client = self._client
        if kind == "params":
            params = [Param(k, v) for k, v in payload]
            client.log_batch(self.run_id, params=params, synchronous=True)
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload], synchronous=True)
        elif kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in payload]
            client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif kind == "artifacts":
            path, artifact_path = payload
            if not Path(path).exists():
                raise FileNotFoundError(f"artifact {path} no longer exists")
            client.log_artifact(self.run_id, path, artifact_path)
        elif kind == "end":
            client.set_terminated(self.run_id, status=payload)

    def _reject(self, job: tuple[str, Any], exc: Exception):
        """MLflow refused ``job`` for good: split a batch into single items, else drop it."""
        kind, payload = job
        with self._cond:
            if kind == "open":
                self._dead = True
                for queue in (self._metrics, self._params, self._tags, self._artifacts):
                    queue.clear()
                self._singles.clear()
                self._end_status = None
            elif kind in ("metrics", "params", "tags") and len(payload) > 1:
                self._singles.extendleft((kind, item) for item in reversed(payload))
                return
            key = (kind, str(payload[0][0] if kind in ("metrics", "params", "tags") else payload))
            if key in self._warned_keys:
                return
            self._warned_keys.add(key)
        if kind == "open":
            logger.warning(
                "tracking: MLflow at %s refused the run (%s); the %s stage goes on without "
                "tracking, and its outputs stay in %s",
                self.uri,
                _reason(exc),
                self.stage,
                self.run_dir,
            )
        else:
            reason = _reason(exc)
            logger.warning("tracking: MLflow rejected %s %s (%s); dropped", kind, key[1], reason)

    def _went_away(self, exc: Exception):
        if self._down_since is not None or self._abandoned:
            return
        self._down_since = time.monotonic()
        logger.warning(
            "tracking: MLflow at %s is unreachable (%s); the %s stage goes on, and what it logs "
            "is queued and sent when MLflow is back (outputs are in %s)",
            self.uri,
            _reason(exc),
            self.stage,
            self.run_dir,
        )

    def _reachable(self):
        if self._down_since is None or self._abandoned:
            return
        with self._cond:
            queued = sum(self._counts().values())
            dropped, self._dropped = self._dropped, 0
        logger.warning(
            "tracking: MLflow at %s is back after %.0f s; sending %d queued records%s",
            self.uri,
            time.monotonic() - self._down_since,
            queued,
            f" ({dropped} older metric points were dropped)" if dropped else "",
        )
        self._down_since = None

    def _wait_to_retry(self, delay: float):
        start = time.monotonic()
        with self._cond:
            while not self._abandoned:
                hurry = self._flush_waiters or self._stopping
                until = start + (min(delay, RETRY_WHILE_FLUSHING_S) if hurry else delay)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
