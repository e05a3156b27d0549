"""The spool: an append-only file of tracking records in the run directory, and the small
state file that says how far it has been delivered to MLflow.

Every log call writes one JSON line to ``RUN_DIR/mlflow-spool.jsonl`` (one ``os.write`` on a
descriptor opened with ``O_APPEND``, so the record is in the kernel before the call returns:
it survives the process being SIGKILLed or OOM-killed; a node crash loses what the kernel had
not written out, which the sender's periodic ``fsync`` bounds to a few seconds). The sender
threads (``sender.Sender``) read the file and deliver it; ``mlflow-spool.state.json``
records their progress (``state.py``), so whoever opens the run directory next sends only
the rest.

Records (``"k"`` first, so that a reader can pick lines by their first bytes):

- ``session``: a Tracker opened: ``q`` (its id, carried by each of its records), ``local``
  (the run it logs into, the same across the sessions of a resumed run, known before MLflow
  has created it), ``uri``, how to create the run (``experiment``, ``run_name``,
  ``create_tags``), the run id if known (``run_id``), ``attach``, ``resumed`` and ``tags``.
- ``params`` (``p``), ``tags`` (``t``), ``metrics`` (``s`` step, ``ts`` ms, ``m`` values;
  ``o`` for points logged once per step), ``artifact`` (``path``, ``dir``), ``end``
  (``status``).

A line that does not parse (the torn tail of a process killed in the middle of a write, once
something was appended after it) is skipped; an unterminated last line is not read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPOOL_FILE = "mlflow-spool.jsonl"
READ_BLOCK = 1 << 20  # a reader holds at most this much of the spool (plus one record)


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps makes one a call


def _dumps(record: dict[str, Any]) -> bytes:
    return (_ENCODER.encode(record) + "\n").encode()


class SpoolWriter:
    """Appends records to the spool: one ``os.write`` each, safe from several threads (and
    processes: ``O_APPEND`` places each write whole at the end)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as spool:
                spool.seek(size - 1)
                torn = spool.read(1) != b"\n"
            if torn:  # a killed writer's partial line: end it, so it is skipped whole
                os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]):
        data = _dumps(record)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self):
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


@dataclass
class Record:
    start: int  # byte offsets of the line in the spool
    end: int
    data: dict[str, Any] | None  # None: a line that does not parse


# The first bytes of the lines of a kind, for readers that parse only some kinds.
SESSION = b'{"k":"session"'
ARTIFACT = b'{"k":"artifact"'
ONCE_METRICS = b'{"k":"metrics","o"'


def read_records(path: Path, start: int, prefixes: tuple[bytes, ...] = ()) -> Iterator[Record]:
    """The complete lines from byte ``start`` on, a block at a time. With ``prefixes``, lines
    that start otherwise are yielded unparsed (data ``{}``): parsing is most of the cost."""
    with open(path, "rb") as spool:
        spool.seek(start)
        offset, pending = start, b""
        while block := spool.read(READ_BLOCK):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            for line in lines:
                end = offset + len(line) + 1
                if prefixes and not line.startswith(prefixes):
                    yield Record(offset, end, {})
                else:
                    yield Record(offset, end, _parse(line))
                offset = end


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "k" in data else None


@dataclass
class SpoolScan:
    """What a new Tracker needs from the spool: the sessions, and per run the last step
    of each metric logged with ``once``."""

    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # q -> session record
    once_steps: dict[str, dict[str, int]] = field(default_factory=dict)  # local -> key -> step

    def last_session(self, uri: str) -> dict[str, Any] | None:
        """The newest session for ``uri`` that made or continued a run of its own."""
        for session in reversed(self.sessions.values()):
            if session.get("uri") == uri and not session.get("attach"):
                return session
        return None

    def known_run_id(self, local: str) -> str | None:
        found = None
        for session in self.sessions.values():
            if session.get("local") == local and session.get("run_id"):
                found = session["run_id"]
        return found


def scan(path: Path) -> SpoolScan:
    result = SpoolScan()
    if not path.exists():
        return result
    for record in read_records(path, 0, prefixes=(SESSION, ONCE_METRICS)):
        data = record.data
        if not data:
            continue
        if data["k"] == "session":
            result.sessions[data.get("q", "")] = data
        elif data["k"] == "metrics":
            session = result.sessions.get(data.get("q", ""))
            if session is None:
                continue
            steps = result.once_steps.setdefault(session["local"], {})
            step = int(data["s"])
            for key in data.get("m", {}):
                if step > steps.get(key, step - 1):
                    steps[key] = step
    return result
