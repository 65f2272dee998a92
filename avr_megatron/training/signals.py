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


def _start_checkpoint_helper(signals) -> None:
    """Megatron's dist-checkpoint writer collects write results through a multiprocessing
    Manager, a helper process spawned at the first save. Slurm (and `kill -TERM -- -PGID`)
    signals every process of the job step, which killed that helper and made the preemption
    checkpoint fail with BrokenPipeError. Start it here with the preemption signals ignored:
    an ignored disposition survives exec, so the helper outlives the signal and the main process
    finishes its checkpoint. (A job killed with SIGKILL takes the helper with it on Slurm, whose
    cgroup/process-group cleanup kills every process of the step.)"""
    try:
        from megatron.core.dist_checkpointing.strategies.filesystem_async import (
            get_write_results_queue,
        )
    except ImportError:  # another Megatron version: nothing to prepare
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        get_write_results_queue()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
            _start_checkpoint_helper(self.SIGNALS)
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
