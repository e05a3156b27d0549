"""The threads that deliver a run directory's spool (``spool.py``) to MLflow.

Training must never wait on MLflow, and nothing may be lost while the server is away or when
the process dies. The Tracker's log calls only append to the spool; two daemon threads read
it and do every MLflow call, in one process per run directory at a time (the one holding the
lock on the spool; another process's Tracker waits for it and meanwhile only reads the
state file):

- The main lane first opens the run of this process's session (checks a known or attached
  run, or creates one as soon as a server answers), then sends the records in order: params,
  tags and metrics in ``log_batch`` calls within MLflow's limits, a session's start (a
  resumed run is set RUNNING again) and a run's end status.
- The artifact lane uploads the artifacts, so that a slow upload holds back neither the
  metrics nor the end status.
- Each lane records in the state file how far it has delivered; a chunk of the main lane
  is recorded as in flight before it is sent, so a successor knows which points MLflow may
  already hold. A resent point keeps its timestamp: the SQL store ignores it; for other
  stores the points of that chunk that the run holds are left out.
- An error a retry can fix (connection refused, timeout, HTTP 5xx, a locked SQLite file)
  retries with back-off (1 s doubling to 10 s, 2 s until the run exists; 1 s while someone
  waits in ``flush``). The first such error logs ONE warning; the first success after it
  logs ONE "back" warning.
  An error a retry cannot fix (HTTP 4xx: a rejected value) drops the batch's items, one by
  one so that a single bad item does not take its neighbours with it, one warning per key.
  A run that cannot be opened (an attached run id MLflow does not know) drops its records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import runs
from .chunks import CHUNK_BYTES, Chunk, identity, read_chunk
from .spool import ARTIFACT, SESSION, SPOOL_FILE, read_records
from .state import DeliveryState, undelivered_counts

logger = logging.getLogger(__name__)

RETRY_MIN_S, RETRY_MAX_S = 1.0, 10.0
# Until this process's run exists, a retry every 2 s at most: the run is created (and its id
# goes into run.json and the next checkpoint) as soon as a server answers.
RETRY_UNOPENED_MAX_S = 2.0
RETRY_WHILE_FLUSHING_S = 1.0
POLL_S = 0.5  # an idle lane looks for new records this often: a few steps share one batch
FSYNC_EVERY_S = 5.0
THREAD_NAME = "mlflow-sender"


def _not_from_sender(record: logging.LogRecord) -> bool:
    return not record.threadName.startswith(THREAD_NAME)


class Sender:
    """Delivers ``run_dir``'s spool; see the module doc. ``own`` is this process's session
    record (None: only deliver what is there); ``on_run(run_id)`` is called when its run is
    known (run.json)."""

    def __init__(
        self,
        *,
        uri: str,
        run_dir: Path,
        stage: str,
        own: dict[str, Any] | None,
        sessions: dict[str, dict[str, Any]],
        on_run: Callable[[str], None],
    ):
        self.uri, self.run_dir, self.stage = uri, run_dir, stage
        self.spool = run_dir / SPOOL_FILE
        self._own, self._sessions, self._on_run = own, sessions, on_run
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # for the outage bookkeeping
        self._resolve_lock = threading.Lock()
        self._st = DeliveryState(run_dir)
        self._follower = False  # another process holds the spool: read its state file
        self._chunk: Chunk | None = None
        self._own_checked = False
        self._stopping = self._abandoned = False
        self._gone = False  # the spool was removed (its run directory deleted)
        self._flush_waiters = 0
        self._down_since: float | None = None
        self._warned: set[str] = set()
        self._client = None
        self._lane_state = threading.local()
        self._synced_at = time.monotonic()
        self.first_attempt = threading.Event()  # the first try to open the run has ended
        # urllib3 warns at every retried request; while the server is away that would be one
        # warning per attempt from these threads, which report the outage once by themselves.
        retries = logging.getLogger("urllib3.connectionpool")
        if _not_from_sender not in retries.filters:
            retries.addFilter(_not_from_sender)
        self._artifact_thread = threading.Thread(
            target=self._artifact_lane, name=THREAD_NAME + "-artifacts", daemon=True
        )
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    # --- what the Tracker asks ---------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        if self._own is None:
            return None
        return self._st.runs.get(self._own["local"]) or self._own.get("run_id")

    @property
    def own_dead(self) -> bool:
        return self._own is not None and self._own["local"] in self._st.dead

    @property
    def own_open(self) -> bool:
        return self._own is not None and self._own["local"] in self._st.runs

    def flush(self, timeout: float, upto: int) -> bool:
        """Wait up to ``timeout`` s until the spool is delivered up to byte ``upto``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()  # cut short a back-off or an idle wait
            try:
                while not (self.own_dead or self._gone):
                    if self._follower:
                        self._st.load()
                    if min(self._st.offsets.values()) >= upto:
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, POLL_S))
                return False
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float, upto: int) -> bool:
        """Flush for up to ``timeout`` s, then stop; warn once about what was not delivered
        (it stays in the spool for the next process)."""
        delivered = self.flush(timeout, upto)
        with self._cond:
            self._stopping = True
            self._abandoned = not delivered
            self._cond.notify_all()
        if delivered:
            self._thread.join(timeout=5)
            if self._artifact_thread.is_alive():
                self._artifact_thread.join(timeout=5)
        elif not (self.own_dead or self._gone):
            self._warn_undelivered(timeout)
        self._st.release()  # an abandoned thread writes no state after this
        return delivered

    # --- bookkeeping -------------------------------------------------------------------

    def _save(self):
        self._st.save()
        with self._cond:
            self._cond.notify_all()

    def _session_of(self, record: dict[str, Any]) -> dict[str, Any] | None:
        if record["k"] == "session":
            self._sessions.setdefault(record.get("q", ""), record)
        session = self._sessions.get(record.get("q", ""))
        if session is not None and session.get("uri") != self.uri:
            self._warn_once(f"uri:{session.get('uri')}", "tracking: records of %s for MLflow at "
                            "%s are not sent to %s; they stay in %s", session.get("stage"),
                            session.get("uri"), self.uri, self.spool)  # fmt: skip
            return None
        return session

    def _warn_once(self, key: str, message: str, *args):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _quit(self) -> bool:
        return self._abandoned or self._stopping or self._gone

    def _idle_wait(self):
        with self._cond:
            if not (self._flush_waiters or self._quit()):
                self._cond.wait(POLL_S)

    def _wait_to_retry(self, delay: float):
        start = time.monotonic()
        with self._cond:
            while not self._quit():
                hurry = self._flush_waiters
                until = start + (min(delay, RETRY_WHILE_FLUSHING_S) if hurry else delay)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _went_away(self, exc: Exception):
        with self._lock:
            if self._down_since is not None or self._abandoned:
                return
            self._down_since = time.monotonic()
        logger.warning(
            "tracking: MLflow at %s is unreachable (%s); the %s stage goes on, and what it logs "
            "is kept in %s and sent when MLflow is back",
            self.uri,
            runs.reason(exc),
            self.stage,
            self.spool,
        )

    def _reachable(self):
        with self._lock:
            if self._down_since is None or self._abandoned:
                return
            down, self._down_since = time.monotonic() - self._down_since, None
        logger.warning("tracking: MLflow at %s is back after %.0f s; sending what was logged "
                       "meanwhile", self.uri, down)  # fmt: skip

    def _mlflow(self):
        self._lane_state.contacted = True
        if self._client is None:
            from mlflow.tracking import MlflowClient  # slow import: here, not in training

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # --- opening runs (either lane; under the resolve lock) ------------------------------

    def _resolve(self, local: str, verify: bool = False):
        """Make sure ``local`` has an MLflow run: a known one (checked if ``verify``), one an
        earlier process created without recording it, or a new one. Raises transient errors."""
        with self._resolve_lock:
            if local in self._st.dead or (local in self._st.runs and not verify):
                return
            # A copy: the other lane may add a session meanwhile.
            sessions = [s for s in list(self._sessions.values()) if s.get("local") == local]
            first = sessions[0]
            known = self._st.runs.get(local) or next(
                (s["run_id"] for s in reversed(sessions) if s.get("run_id")), None
            )
            client = self._mlflow()
            if known:
                state = runs.run_state(client, known)
                if state == "active":
                    how = "logging into" if first.get("attach") else "continuing"
                    return self._opened(local, known, how)
                if first.get("attach") or state == "refused":
                    return self._refused(local, f"run {known} is {state}")
                logger.warning("tracking: MLflow run %s of %s is gone; starting a new one",
                               known, self.run_dir / "run.json")  # fmt: skip
            elif self._own is None or first.get("q") != self._own.get("q"):
                found = runs.find_created(client, first)
                if found:
                    return self._opened(local, found, "continuing")
            store = runs.artifacts_beside(self.uri)
            try:
                run_id = runs.create_run(client, first, store)
            except Exception as exc:
                if not runs.is_permanent(exc):
                    raise
                return self._refused(local, runs.reason(exc))
            self._opened(local, run_id, "")

    def _opened(self, local: str, run_id: str, how: str):
        self._st.runs[local] = run_id
        self._save()
        if self._own is not None and local == self._own["local"]:
            self._on_run(run_id)
            logger.info("tracking: %sMLflow run %s at %s", how and how + " ", run_id, self.uri)

    def _refused(self, local: str, why: str):
        self._st.dead.add(local)
        self._save()
        logger.warning(
            "tracking: MLflow at %s refused the run (%s); the %s stage goes on without "
            "tracking, and its outputs stay in %s",
            self.uri,
            why,
            self.stage,
            self.run_dir,
        )

    # --- the main lane -----------------------------------------------------------------

    def _run(self):
        while True:
            try:
                if self._st.acquire():
                    break
            except OSError as exc:  # the spool is gone (or unreadable): nothing to send
                logger.warning("tracking: cannot read %s (%s); nothing is sent to MLflow",
                               self.spool, exc)  # fmt: skip
                self._gone = True
                self.first_attempt.set()
                return
            self._follower = True  # another process delivers: follow its progress
            self.first_attempt.set()
            with self._cond:
                if self._quit():
                    return
                self._cond.wait(1.0)
            self._st.load()
        self._follower = False
        self._artifact_thread.start()
        self._lane(self._main_step)

    def _lane(self, step: Callable[[], bool]):
        delay = RETRY_MIN_S
        while not self._quit():
            self._lane_state.contacted = False
            try:
                busy = step()
            except Exception as exc:  # every failure of a request is retried
                logger.debug("tracking: delivery to %s failed", self.uri, exc_info=True)
                if isinstance(exc, FileNotFoundError) and not self.spool.exists():
                    self._warn_once("gone", "tracking: %s was removed; nothing more is sent "
                                    "to MLflow", self.spool)  # fmt: skip
                    self._gone = True
                    with self._cond:
                        self._cond.notify_all()
                    return
                if step == self._main_step:
                    self.first_attempt.set()
                self._went_away(exc)
                self._wait_to_retry(delay)
                unopened = self._own is not None and not (self.own_open or self.own_dead)
                delay = min(2 * delay, RETRY_UNOPENED_MAX_S if unopened else RETRY_MAX_S)
                continue
            if self._lane_state.contacted:  # a step that made no request proves nothing
                self._reachable()
            delay = RETRY_MIN_S
            if not busy:
                self._idle_wait()

    def _main_step(self) -> bool:
        if self._own is not None and not self._own_checked:
            self._resolve(self._own["local"], verify=True)
            self._own_checked = True
            self.first_attempt.set()
        if time.monotonic() - self._synced_at > FSYNC_EVERY_S:  # bound what a node crash loses
            self._synced_at = time.monotonic()
            self._st.sync()
        if self._chunk is None:
            self._chunk = read_chunk(self.spool, self._st.offsets["main"], self._session_of)
            if self._chunk is None:
                return False
        chunk = self._chunk
        if chunk.local is not None and chunk.local not in self._st.dead:
            self._resolve(chunk.local)
        if chunk.local is not None and chunk.local not in self._st.dead:
            run_id = self._st.runs[chunk.local]
            if chunk.jobs is None:
                chunk.build_jobs(self._held(run_id, chunk))
                self._st.inflight = (chunk.start, chunk.end)
                self._save()
            while chunk.jobs:
                self._send(run_id, chunk.jobs)
        self._st.offsets["main"], self._st.inflight, self._chunk = chunk.end, None, None
        self._save()
        return True

    def _held(self, run_id: str, chunk: Chunk) -> set | None:
        """The points of a chunk that was in flight when the last sender stopped and that
        the store already holds (a store that ignores identical points needs no check)."""
        if self._st.inflight is None or chunk.start >= self._st.inflight[1]:
            return None
        if runs.ignores_identical_points(self.uri):
            return None
        window = [p for p in chunk.metrics if p[4] <= self._st.inflight[1]]
        if not window:
            return None
        held = runs.held_points(self._mlflow(), run_id, {p[0] for p in window})
        return {identity(p) for p in window} & held

    def _send(self, run_id: str, jobs: deque):
        """Deliver the first job; on an error no retry fixes, split it or drop it."""
        kind, payload = jobs[0]
        try:
            runs.deliver(self._mlflow(), run_id, kind, payload)
        except Exception as exc:
            if not runs.is_permanent(exc):
                raise
            jobs.popleft()
            if kind in ("params", "tags", "metrics") and len(payload) > 1:
                jobs.extendleft((kind, [item]) for item in reversed(payload))
                return
            what = str(payload[0][0]) if kind in ("params", "tags", "metrics") else payload["k"]
            self._warn_once(f"{kind}:{what}", "tracking: MLflow rejected %s %s (%s); dropped",
                            kind, what, runs.reason(exc))  # fmt: skip
            return
        jobs.popleft()

    # --- the artifact lane -------------------------------------------------------------

    def _artifact_lane(self):
        self._lane(self._artifact_step)

    def _artifact_step(self) -> bool:
        start = self._st.offsets["artifacts"]
        for record in read_records(self.spool, start, prefixes=(SESSION, ARTIFACT)):
            data = record.data
            session = self._session_of(data) if data else None
            if session is not None and data["k"] == "artifact":
                self._upload(session["local"], data)
            self._st.offsets["artifacts"] = record.end
            if (data and data["k"] == "artifact") or record.end - start >= CHUNK_BYTES:
                break
        if self._st.offsets["artifacts"] == start:
            return False
        self._save()
        return True

    def _upload(self, local: str, data: dict[str, Any]):
        self._resolve(local)
        if local in self._st.dead:
            return
        try:
            if not Path(data["path"]).exists():
                raise FileNotFoundError(f"artifact {data['path']} no longer exists")
            self._mlflow().log_artifact(self._st.runs[local], data["path"], data.get("dir"))
        except Exception as exc:
            if not runs.is_permanent(exc):
                raise
            self._warn_once(f"artifact:{data['path']}", "tracking: MLflow rejected artifact "
                            "%s (%s); dropped", data["path"], runs.reason(exc))  # fmt: skip

    # --- giving up -----------------------------------------------------------------------

    def _warn_undelivered(self, timeout: float):
        counts = undelivered_counts(self.spool, self._st.offsets, self._sessions, self.uri)
        lost = [f"{n} {label}" for label, n in counts.items() if n and label != "end"]
        lost += ["the run's end status"] if counts["end"] else []
        logger.warning(
            "tracking: gave up on MLflow at %s after %.0f s%s: not delivered: %s; they are "
            "kept in %s, and the next job that opens %s (a resume, a requeue) sends them",
            self.uri,
            timeout,
            "" if self.own_open else " (the run was never created)",
            ", ".join(lost) or "nothing else",
            self.spool,
            self.run_dir,
        )
