"""The decisions the training loop takes after each step, in plain Python (no torch, no Megatron,
testable in milliseconds): when to checkpoint and what to keep, when to validate, and when
skipped steps abort the run."""

from __future__ import annotations

from dataclasses import dataclass

FINISHED, PREEMPTED = "finished", "preempted"


@dataclass
class CheckpointPolicy:
    """When the loop saves a checkpoint: every save_interval steps (0: never during the run);
    at the end of a preempted run (SIGTERM/SIGUSR1: the requeued job resumes from it), of any
    run when save_final, and of a finished run that exports (the export reads the last
    checkpoint); never twice at one iteration. What is kept: the keep_last newest (None: all)."""

    save_interval: int = 0
    save_final: bool = True
    export: bool = False  # checkpoint.export_hf is set
    keep_last: int | None = 2
    # The iteration of the newest checkpoint this run saved or resumed from.
    last_saved: int | None = None

    @classmethod
    def from_config(cls, checkpoint, resumed_at: int | None = None) -> "CheckpointPolicy":
        """checkpoint: the config's checkpoint section; resumed_at: the iteration of the
        checkpoint the run resumed from (None: a fresh start)."""
        return cls(save_interval=checkpoint.save_interval, save_final=checkpoint.save_final,
                   export=checkpoint.export_hf is not None,
                   keep_last=checkpoint.keep_last or None, last_saved=resumed_at)

    def save_after_step(self, iteration: int) -> bool:
        return bool(self.save_interval) and iteration % self.save_interval == 0

    def exports(self, status: str) -> bool:
        return status == FINISHED and self.export

    def save_at_end(self, iteration: int, status: str) -> bool:
        wanted = status == PREEMPTED or self.save_final or self.exports(status)
        return wanted and self.last_saved != iteration

    def saved(self, iteration: int) -> None:
        self.last_saved = iteration


@dataclass
class SkippedSteps:
    """Steps skipped for a non-finite loss or gradients: the total, and the current streak;
    train.max_consecutive_nonfinite in a row abort the run. Both are saved in checkpoints, so
    a resumed run continues the count."""

    limit: int
    total: int = 0
    streak: int = 0

    @classmethod
    def from_state(cls, state: dict, limit: int) -> "SkippedSteps":
        return cls(limit, int(state.get("skipped_steps", 0)),
                   int(state.get("nonfinite_streak", 0)))

    def record(self, updated: bool) -> None:
        if updated:
            self.streak = 0
        else:
            self.total += 1
            self.streak += 1

    @property
    def aborts(self) -> bool:
        return self.streak >= self.limit

    def state(self) -> dict:
        """What a checkpoint stores (the keys from_state reads)."""
        return {"skipped_steps": self.total, "nonfinite_streak": self.streak}


def validation_due(iteration: int, eval_interval: int | None, train_iters: int) -> bool:
    """Validate every eval_interval steps (None/0: only at the end) and after the last step."""
    every = eval_interval or 0
    return bool(every and iteration % every == 0) or iteration == train_iters
