"""How far a run directory's spool has been delivered: ``mlflow-spool.state.json``, written
only by the process that holds the lock on the spool (the one that delivers it).

It holds each lane's byte offset (everything before it is delivered, or dropped for good),
the main lane's chunk in flight (sent, perhaps taken by MLflow, not yet acknowledged), the
MLflow run of each spool run (``local`` -> run id) and the spool runs MLflow refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from pathlib import Path

from .spool import SPOOL_FILE

logger = logging.getLogger(__name__)

STATE_FILE = "mlflow-spool.state.json"
LANES = ("main", "artifacts")


class DeliveryState:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._fd: int | None = None  # the lock on the spool, while this process holds it
        self.load()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def load(self):
        """Read the state file (this process starts delivering, or follows another)."""
        path = self.run_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = {}
        except ValueError:
            logger.warning("tracking: %s is not valid JSON; the spool is sent again from the "
                           "start", path)  # fmt: skip
            state = {}
        state = state if isinstance(state, dict) else {}
        self.runs: dict[str, str] = dict(state.get("runs", {}))
        self.dead: set[str] = set(state.get("dead", []))
        self.offsets = {lane: int(state.get(lane, 0)) for lane in LANES}
        inflight = state.get("inflight")
        self.inflight: tuple[int, int] | None = tuple(inflight) if inflight else None

    def save(self):
        """Replace the state file whole (a rename: a kill leaves the old or the new one);
        nothing once this process has let go of the spool."""
        with self._lock:
            if self._fd is None:
                return
            state = {**self.offsets, "inflight": self.inflight, "runs": self.runs,
                     "dead": sorted(self.dead)}  # fmt: skip
            tmp = self.run_dir / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.run_dir / STATE_FILE)

    def acquire(self) -> bool:
        """Take the lock on the spool, and with it the delivery; False while another process
        has it. Where the file system has no locks (Lustre mounted without ``flock``) it goes
        without: one process per run directory is the rule anyway (rank 0)."""
        with self._lock:
            fd = os.open(self.run_dir / SPOOL_FILE, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    return False
                logger.debug("tracking: no lock on the spool (%s); delivering without", exc)
            self._fd = fd
        self.load()  # the previous holder may have got further
        return True

    def sync(self):
        """Have the kernel write the spool to disk (a node crash loses less)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def release(self):
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None


def undelivered_counts(path: Path, offsets: dict, sessions: dict, uri: str) -> dict[str, int]:
    """What the records for ``uri`` after the lanes' offsets hold (for a warning)."""
    from .spool import read_records

    counts = dict.fromkeys(("metric points", "params", "tags", "artifacts", "end"), 0)
    sizes = {"metrics": ("metric points", "m"), "params": ("params", "p"), "tags": ("tags", "t")}
    for lane, offset in offsets.items():
        for record in read_records(path, offset):
            data = record.data
            session = sessions.get(data.get("q", "")) if data else None
            if session is None or session.get("uri") != uri:
                continue
            kind = data["k"]
            if lane == "artifacts":
                counts["artifacts"] += kind == "artifact"
            elif kind in sizes:
                counts[sizes[kind][0]] += len(data[sizes[kind][1]])
            else:
                counts["end"] += kind == "end"
    return counts
