"""`avr train sft|dpo` and `avr logps`: training runs and reference log-probs from a recipe.

Exit codes (docs/faults.md): 0 done, 2 bad recipe/data/reference log-probs/checkpoint (message
names the key, file, record or field; a checkpoint whose pickles would run code is refused),
1 aborted (non-finite losses), 74 storage (disk full or read-only: the message names the path,
what was kept and how to resume), 75 preempted (SIGTERM/SIGUSR1: checkpoint saved; rerun the
same command to resume).
"""

from __future__ import annotations

import sys

from avr_megatron.runtime.files import EXIT_STORAGE


def shutdown() -> None:
    """Tear down process groups if any were created (bad input fails before that)."""
    if "megatron.core.parallel_state" in sys.modules:
        from avr_megatron.runtime.distributed import shutdown as full_shutdown

        full_shutdown()


def _storage_error(command: str, cfg, e: Exception):
    """A StorageError for `e` (raised as one, or an OSError of a full/read-only disk while
    writing under run.dir), else None."""
    from pathlib import Path

    from avr_megatron.runtime.files import StorageError, storage_error

    if isinstance(e, StorageError):
        return e
    if not isinstance(e, OSError):
        return None
    path = e.filename or Path(cfg.run.dir)
    kept = ("the log-prob parts written so far (the rerun computes only the rest)"
            if command == "logps" else "every checkpoint saved so far (the rerun resumes from the "
                                     "newest)")
    return storage_error(path, e, kept=kept, probe=False)


def _failed_summary(command: str, cfg, error) -> None:
    """train_summary.json saying why the run stopped, where the disk allows it."""
    import json
    from pathlib import Path

    from avr_megatron.runtime.files import atomic_write_text

    try:
        atomic_write_text(Path(cfg.run.dir) / "train_summary.json", json.dumps(
            {"stage": command, "status": "failed", "error": str(error)}, indent=2) + "\n")
    except OSError:
        pass


def _report(command: str, fn, cfg) -> int:
    from avr_megatron.checkpoint.dist_ckpt import CheckpointError
    from avr_megatron.data.records import DataError
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.training.loop import TrainingAborted
    from avr_megatron.training.reference import ReferenceLogpsError

    try:
        result = fn(cfg)
    except (DataError, ReferenceLogpsError, CheckpointError) as e:
        print(f"avr {command}: error: {e}", file=sys.stderr)
        shutdown()
        return 2
    except TrainingAborted as e:
        print(f"avr {command}: aborted: {e}", file=sys.stderr)
        shutdown()
        return 1
    except Exception as e:
        error = _storage_error(command, cfg, e)
        if error is None:
            raise
        print(f"avr {command}: error: {error}", file=sys.stderr)
        if is_rank0():
            _failed_summary(command, cfg, error)
        shutdown()
        return EXIT_STORAGE
    code = 0
    if hasattr(result, "summary") and is_rank0():
        s = result.summary
        last = s["last"]
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "rewards/accuracies")
                          if isinstance(last.get(k), float))
        print(f"avr {command}: {s['status']} at iteration {s['iteration']}/{s['train_iters']} "
              f"({shown}); summary in {cfg.run.dir}/train_summary.json, checkpoints in "
              f"{s['checkpoint_dir']}")
        code = result.exit_code
    elif is_rank0():
        for path, computed in result:
            print(f"avr {command}: reference log-probs "
                  f"{'written to' if computed else 'up to date in'} {path}")
    shutdown()
    return code


def sft(args, cfg) -> int:
    from avr_megatron.training.runs import run_sft

    return _report("train sft", run_sft, cfg)


def dpo(args, cfg) -> int:
    from avr_megatron.training.runs import run_dpo

    return _report("train dpo", run_dpo, cfg)


def logps(args, cfg) -> int:
    from avr_megatron.training.runs import run_logps

    return _report("logps", run_logps, cfg)
