"""SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) -> checkpoint, then exit.

The handler only records the signal; the loop checks it between steps (all ranks agree through
one all-reduce, since signals reach ranks at different moments), saves a checkpoint and stops
with EXIT_PREEMPTED so that wrappers do not mistake the stop for the end of training.
"""

from __future__ import annotations

import logging
import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume) later
log = logging.getLogger(__name__)


class PreemptionSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: checkpointing after the current step, then exiting",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
