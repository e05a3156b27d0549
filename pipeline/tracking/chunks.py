"""How the main lane cuts the spool into MLflow calls: consecutive records of one run make a
chunk (sent as params, tags and metrics batches within MLflow's limits), and a session's
start or a run's end is a chunk of its own, so the order of what changes a run's status is
kept."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .spool import read_records

logger = logging.getLogger(__name__)

# MLflow's limits on one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
CHUNK_BYTES = 1 << 20  # the most of the spool one chunk covers: what a lane holds in memory

Point = tuple[str, float, int, int, int]  # key, value, timestamp (ms), step, end of its line


class Chunk:
    """Consecutive spool records of one run, sent together (or one session/end record)."""

    def __init__(self, start: int):
        self.start = self.end = start
        self.local: str | None = None  # the run; None: nothing to send (skipped lines)
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: list[Point] = []
        self.action: tuple[str, dict] | None = None  # ("session" | "end", record)
        self.jobs: deque[tuple[str, Any]] | None = None  # built once the run is known

    def full(self) -> bool:
        return (
            len(self.metrics) >= MAX_METRICS_PER_BATCH
            or len(self.params) >= MAX_PARAMS_PER_BATCH
            or len(self.tags) >= MAX_TAGS_PER_BATCH
            or self.end - self.start >= CHUNK_BYTES
        )

    def build_jobs(self, leave_out: set | None = None):
        """The MLflow calls, leaving out the points in ``leave_out`` (see ``identity``)."""
        jobs: deque[tuple[str, Any]] = deque()
        if self.action is not None:
            jobs.append(self.action)
        batches = (
            ("params", list(self.params.items()), MAX_PARAMS_PER_BATCH),
            ("tags", list(self.tags.items()), MAX_TAGS_PER_BATCH),
            ("metrics", [p[:4] for p in self.metrics if identity(p) not in (leave_out or ())],
             MAX_METRICS_PER_BATCH),
        )  # fmt: skip
        for kind, items, size in batches:
            jobs.extend((kind, items[i : i + size]) for i in range(0, len(items), size))
        self.jobs = jobs


def identity(point) -> tuple[str, int, int, float]:
    """What makes two metric points the same to the SQL store: key, step, timestamp, value."""
    key, value, timestamp, step = point[:4]
    return (key, step, timestamp, value)


def read_chunk(path: Path, start: int, session_of: Callable[[dict], dict | None]) -> Chunk | None:
    """The next chunk from byte ``start``, or None when there is nothing new.
    ``session_of(record)`` is the session a record belongs to, None to skip it (a session
    for another URI); artifacts are the other lane's, unreadable lines are skipped."""
    chunk = Chunk(start)
    for record in read_records(path, start):
        data = record.data
        session = session_of(data) if data and data["k"] != "artifact" else None
        if session is None:
            if data is None:
                logger.debug("tracking: skipped an unreadable line of %s at %d", path, start)
            chunk.end = record.end
            if chunk.full():
                break
            continue
        local, kind = session["local"], data["k"]
        has_data = chunk.params or chunk.tags or chunk.metrics
        if has_data and (kind in ("session", "end") or local != chunk.local):
            break
        chunk.local, chunk.end = local, record.end
        if kind in ("session", "end"):
            chunk.action = (kind, data)
            break
        if kind == "params":
            chunk.params.update(data["p"])
        elif kind == "tags":
            chunk.tags.update(data["t"])
        elif kind == "metrics":
            step, ts, end = int(data["s"]), int(data["ts"]), record.end
            chunk.metrics.extend((k, v, ts, step, end) for k, v in data["m"].items())
        if chunk.full():
            break
    return chunk if chunk.end > start else None
