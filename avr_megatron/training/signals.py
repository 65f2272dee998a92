"""SIGTERM / SIGUSR1 (Slurm preemption, `scancel --signal`) -> checkpoint, then exit 75.

`install_startup_handlers()` runs first thing in every `avr` command: a preemption signal that
arrives while the command starts up (imports, data, model build, checkpoint load), before any
work could be lost, ends it at once with EXIT_PREEMPTED, so the Slurm wrapper requeues it
instead of seeing death by signal (-15). The training loop then takes over with
`PreemptionSignals`, whose handler only records the signal; the loop checks it between steps
(all ranks agree through one all-reduce, since signals reach ranks at different moments), saves
a checkpoint and stops with EXIT_PREEMPTED so that wrappers do not mistake the stop for the end
of training.

Helper processes die with their trainer: Megatron's checkpoint-writer Manager is started by us
with PR_SET_PDEATHSIG (Linux), so a kill -9 or the OOM killer leaves no process behind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume) later
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = logging.getLogger(__name__)
# The preemption signal received while starting, if any. Python swallows an exception raised
# by a signal handler that runs inside a callback it guards (e.g. importlib's module-lock
# weakref callback: "Exception ignored in ..."), so the SystemExit alone can be lost and the
# command would run on; the training loop checks this before its first step.
_startup_signal: int | None = None


def _exit_preempted(signum, frame):
    global _startup_signal
    _startup_signal = signum
    name = signal.Signals(signum).name
    print(f"avr: received {name} while starting: exiting with {EXIT_PREEMPTED} (nothing was "
          "lost; rerun the same command to resume)", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_PREEMPTED)


def exit_if_preempted_while_starting() -> None:
    """Exit EXIT_PREEMPTED if a start-up preemption signal was received but its SystemExit was
    swallowed (see `_startup_signal`)."""
    if _startup_signal is not None:
        raise SystemExit(EXIT_PREEMPTED)


def install_startup_handlers() -> None:
    """SIGTERM/SIGUSR1 -> exit EXIT_PREEMPTED, until a command installs its own handling (main
    thread only; elsewhere Python cannot set handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in PREEMPTION_SIGNALS:
            signal.signal(s, _exit_preempted)


def die_with_parent(parent_pid: int, ignore: tuple[int, ...] = ()) -> None:
    """In a helper process: get SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG; a no-op
    elsewhere), exit at once if it already has, and ignore `ignore` (the preemption signals,
    which Slurm sends to every process of the step while the parent still needs its helper)."""
    for s in ignore:
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(0)


_helpers: list = []  # managers we started (kept referenced: dropping one shuts it down)


def _start_checkpoint_helper(signals) -> None:
    """Megatron's dist-checkpoint writer collects write results through a multiprocessing
    Manager, a helper process it spawns at the first save and never stops. Start it here
    instead, in Megatron's slot (`filesystem_async._results_queue`), so that it
    - ignores the preemption signals: Slurm (and `kill -TERM -- -PGID`) signals every process
      of the job step, which killed the helper and made the preemption checkpoint fail with
      BrokenPipeError (the disposition is also ignored around the start, as it survives exec);
    - dies with the trainer (`die_with_parent`): after a kill -9 or the OOM killer the helper
      (a spawned interpreter of ~700 MB) stayed alive, orphaned, for ever."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # another Megatron version: nothing to prepare
        return
    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent,
                      initargs=(os.getpid(), tuple(int(s) for s in signals)))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _helpers.append(manager)
    filesystem_async._results_queue = manager.Queue()


class PreemptionSignals:
    SIGNALS = PREEMPTION_SIGNALS

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is None:
            log.warning("received %s: checkpointing after the current step, then exiting",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self):
        exit_if_preempted_while_starting()
        if threading.current_thread() is threading.main_thread():
            _start_checkpoint_helper(self.SIGNALS)
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
