"""Preemption: SIGTERM or SIGUSR1 asks the run to finish its step, checkpoint and exit with
``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again"), which a Slurm script or any
supervisor can take as "requeue me; the checkpoint is written".

The handler only sets a flag. The loop all-reduces it once per step, so every rank stops
after the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("pipeline.train")

PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning(
                "received %s: checkpointing after this step, then exiting", self.signal_name
            )

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
