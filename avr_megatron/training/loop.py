"""The one training loop. It knows Megatron (schedules, DDP, optimizer, checkpoints), data
sharding, logging and fault handling; what is learned comes from the injected objective:

    objective.name / .data_kind / .progress_metrics
    objective.prepare(batches)                    attach per-step inputs (reference log-probs)
    objective.forward_step(data_iterator, model)  Megatron's forward step: (output, loss_func)
                                                  loss_func -> (loss_sum, count, metrics)

Losses are normalised by the global count (Megatron's per-token loss: gradients are divided by
the sum of counts over all microbatches and data-parallel ranks), so a step's loss does not
depend on micro-batching or the parallel layout.

Faults: a step whose loss or gradients are not finite is skipped (no update) and counted, and
train.max_consecutive_nonfinite in a row abort. SIGTERM/SIGUSR1 checkpoint and stop with
EXIT_PREEMPTED. Checkpoints hold model, optimizer, scheduler and the step; the data order is a
function of the step, so a resumed run reproduces the uninterrupted run's losses.

Trainer.run wires small parts: the train step (training/step.py, through the one schedule
runner in training/schedule.py), each step's metrics row and the summary's statistics
(training/report.py), and when to checkpoint, validate or abort (training/policy.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from avr_megatron.config import AvrConfig, ConfigError, save_config
from avr_megatron.config.layout import ParallelLayout
from avr_megatron.config.resolve import resolve_iterations
from avr_megatron.data.batches import collate, trims_padding
from avr_megatron.data.dataset import TrainingData
from avr_megatron.data.sampler import StepSampler
from avr_megatron.runtime.device import device, on_gpu
from avr_megatron.runtime.distributed import is_rank0
from avr_megatron.runtime.files import atomic_write_text
from avr_megatron.training.policy import (FINISHED, PREEMPTED, CheckpointPolicy, SkippedSteps,
                                          validation_due)
from avr_megatron.training.report import History, StepMetrics, StepTokens
from avr_megatron.training.signals import EXIT_PREEMPTED, PreemptionSignals
from avr_megatron.training.step import StepResult

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    pass


@dataclass
class TrainResult:
    status: str  # finished | preempted
    exit_code: int
    summary: dict
    chunks: list
    optimizer: object
    scheduler: object


def _any_rank(*flags: bool) -> list[bool]:
    """OR of each flag over all ranks, in one all-reduce."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


class Trainer:
    def __init__(self, cfg: AvrConfig, objective, data: TrainingData, layout: ParallelLayout,
                 *, use_te: bool, progress: bool = True, extra_summary: dict | None = None,
                 validation=None):
        """validation: an avr_megatron.training.evaluation.Validation (data.valid), or None."""
        self.cfg, self.objective, self.data, self.layout = cfg, objective, data, layout
        self.validation = validation
        self.last_eval: dict = {}
        self.use_te, self.progress = use_te, progress
        self.extra_summary = extra_summary or {}
        t = cfg.train
        self.bins_per_microbatch = t.micro_batch_size
        try:
            self.sampler = StepSampler(data.plan.num_bins, t.global_batch_size, cfg.run.seed,
                                       cfg.data.shuffle)
        except ValueError as e:  # too little data for one step: a data problem, named as such
            from avr_megatron.data.records import DataError

            raise DataError(f"data.train={cfg.data.train}: {e}; add data or lower "
                            "train.global_batch_size") from None
        # The one value that needs the dataset's size: train.train_iters from data.num_epochs,
        # settled here into a new frozen config (the LR schedule and config.yaml read it).
        self.cfg = cfg = resolve_iterations(cfg, self.sampler.steps_per_epoch)
        self.train_iters = cfg.train.train_iters
        self.ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.run.dir) / "checkpoints")

    # ---------------------------------------------------------------- setup

    def _build(self):
        from avr_megatron.checkpoint.dist_ckpt import CheckpointError, load_newest_intact, resolve
        from avr_megatron.models.llama import build_model, unwrap
        from avr_megatron.runtime.distributed import seed_everything
        from avr_megatron.training.init import load_initial_weights
        from avr_megatron.training.setup import build_optimizer, build_scheduler, wrap_ddp

        cfg = self.cfg
        resume_from = None
        if cfg.checkpoint.resume:
            try:
                resume_from = resolve(self.ckpt_dir)
            except CheckpointError:
                resume_from = None
        seed_everything(cfg.run.seed)
        chunks = build_model(cfg)
        # Per-token normalisation: Megatron divides gradients by the global sum of counts
        # (set before DDP is built: it decides the DP gradient scaling).
        for chunk in chunks:
            unwrap(chunk).config.calculate_per_token_loss = True
        self.init_source = "resume"
        if resume_from is None:
            self.init_source = load_initial_weights(chunks, cfg, cfg.model.init_from,
                                                    "model.init_from")
        chunks = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(chunks, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        state = {}
        if resume_from is not None:
            # The newest checkpoint that loads: a corrupted newest one is named in a warning and
            # the previous one used (checkpoint.keep_last >= 2 keeps one).
            meta, resume_from = load_newest_intact(
                self.ckpt_dir, chunks, optimizer=optimizer, scheduler=scheduler,
                any_rank=lambda failed: _any_rank(failed)[0],
                fully_parallel=cfg.checkpoint.fully_parallel_load)
            state = meta["state"]
            self._check_resume(state, resume_from)
            log.info("resumed from %s at iteration %d", resume_from, meta["iteration"])
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        return state

    def _check_resume(self, state: dict, ckpt: Path) -> None:
        if state.get("stage") not in (None, self.objective.name):
            raise ConfigError(f"{ckpt} is a {state['stage']!r} checkpoint; this is a "
                              f"{self.objective.name!r} run: use another checkpoint.dir or "
                              "start from it with model.init_from.mcore")
        mine = self.data.data.fingerprint()
        if state.get("examples_fingerprint") not in (None, mine):
            raise ConfigError(
                f"{ckpt} was trained on other data (examples fingerprint "
                f"{state['examples_fingerprint']}, now {mine}): resuming would not continue the "
                "same run; use a new checkpoint.dir (and model.init_from.mcore to start from it)")

    # ---------------------------------------------------------------- per step

    def _batches(self, step: int):
        from megatron.core import parallel_state

        bins = self.sampler.rank_batch(step, parallel_state.get_data_parallel_rank(),
                                       self.layout.dp)
        k = self.bins_per_microbatch
        trim = trims_padding(self.use_te, self.layout.pp)
        return [collate(self.data.data, self.data.plan, bins[i:i + k], self.data.chat.pad_id,
                        trim=trim) for i in range(0, len(bins), k)]

    def _step_tokens(self, step: int) -> StepTokens:
        """Real tokens, trained tokens and the sum of squared sequence lengths of the step's
        global batch."""
        d, plan = self.data.data, self.data.plan
        units = np.concatenate([plan.bin(int(b)) for b in self.sampler.global_batch(step)])
        seqs = np.concatenate([np.arange(u * d.seqs_per_unit, (u + 1) * d.seqs_per_unit)
                               for u in units])
        lengths = d.seq_offsets[seqs + 1] - d.seq_offsets[seqs]  # only this batch's entries
        targets = sum(d.sequence_targets(int(s)) for s in seqs)
        return StepTokens(int(lengths.sum()), int(targets), int((lengths ** 2).sum()))

    def _save(self, iteration: int, counters: dict, keep_last: int | None) -> Path:
        from avr_megatron.checkpoint.dist_ckpt import save_checkpoint, save_failure
        from avr_megatron.training.setup import params_synced

        state = {"stage": self.objective.name, "iteration": iteration,
                 "consumed_bins": iteration * self.cfg.train.global_batch_size,
                 "examples_fingerprint": self.data.data.fingerprint(), **counters,
                 "lineage": self._lineage()}
        try:
            with params_synced(self.chunks):
                return save_checkpoint(self.ckpt_dir, iteration, self.chunks, self.cfg,
                                       optimizer=self.optimizer, scheduler=self.scheduler,
                                       state=state, keep_last=keep_last)
        except BaseException as e:  # disk full / read-only: say so, name what was kept
            # (DCP reports write failures as CheckpointException, a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = save_failure(self.ckpt_dir, iteration, e)
            if error is None:
                raise
            raise error from e

    def _lineage(self) -> dict:
        """What an exported model's card says it was trained on (see conversion/model_card)."""
        def data(td):
            return {"files_fingerprint": td.files_fingerprint,
                    "examples_fingerprint": td.data.fingerprint(), "examples": len(td.data),
                    "tokens": td.data.summary.tokens}

        return {"train_iters": self.train_iters,
                "tokenizer_fingerprint": self.data.tokenizer_fingerprint,
                "train": data(self.data),
                "valid": data(self.validation.data) if self.validation else None,
                "eval": self.last_eval or None}

    def _evaluate(self, seq_length: int, mbs: int, n_mb: int) -> dict:
        from megatron.core import parallel_state

        from avr_megatron.training.evaluation import evaluate

        t0 = time.time()
        t = self.cfg.train
        result = evaluate(self.objective, self.chunks, self.validation,
                          global_batch_size=t.global_batch_size,
                          micro_batch_size=self.bins_per_microbatch, eval_iters=t.eval_iters,
                          dp_rank=parallel_state.get_data_parallel_rank(), dp=self.layout.dp,
                          seq_length=seq_length, schedule_micro_batch_size=mbs,
                          microbatches_per_call=n_mb)
        result["eval/seconds"] = time.time() - t0
        self.last_eval = result
        return result

    def _mfu_denominator(self) -> float | None:
        if not on_gpu():
            return None
        from avr_megatron.training.flops import peak_flops

        peak = peak_flops(torch.cuda.get_device_name(), self.cfg.precision.fp8 is not None,
                          self.cfg.logging.peak_tflops)
        return None if peak is None else peak * self.layout.world_size

    # ---------------------------------------------------------------- the loop

    def _step(self, iteration: int, seq_length: int, mbs: int) -> StepResult:
        """One optimizer step on this rank's share of the iteration's global batch."""
        from avr_megatron.training.step import train_step

        batches = self._batches(iteration)
        self.objective.prepare(batches)
        return train_step(self.objective.forward_step, batches, self.chunks, self.optimizer,
                          self.scheduler, seq_length=seq_length, micro_batch_size=mbs)

    def _step_metrics(self) -> StepMetrics:
        ref_factor = getattr(getattr(self.objective, "reference", None), "flops_factor", 0.0)
        t = self.cfg.train
        return StepMetrics(self.cfg.model, t.global_batch_size, t.seq_length,
                           self.layout.world_size, ref_factor, self._mfu_denominator())

    def run(self) -> TrainResult:
        """The loop: a train step, its metrics row (plus validation when due), the skipped-step
        rule, the checkpoint policy; then the end-of-run checkpoint, export and summary."""
        from avr_megatron.training.metrics_log import MetricsLog, ProgressLog
        from avr_megatron.training.schedule import schedule_shape
        from avr_megatron.training.setup import num_microbatches, params_synced

        cfg, rank0 = self.cfg, is_rank0()
        state = self._build()
        start = int(state.get("iteration", 0))
        skipped = SkippedSteps.from_state(state, cfg.train.max_consecutive_nonfinite)
        checkpoints = CheckpointPolicy.from_config(cfg.checkpoint,
                                                   resumed_at=start if state else None)
        seq_length, mbs = schedule_shape(cfg.train.seq_length, self.bins_per_microbatch,
                                         self.use_te)
        n_mb = num_microbatches(cfg, self.layout)
        if rank0:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        metrics_log = MetricsLog(cfg, start, rank0)
        step_metrics = self._step_metrics()
        history = History()
        status = FINISHED
        t_start = time.time()
        bar = ProgressLog(cfg, f"avr train {self.objective.name}", self.train_iters, start,
                          self.progress and rank0, self.objective.progress_metrics)
        it = start
        with PreemptionSignals() as signals:
            for it in range(start, self.train_iters):
                t0 = time.time()
                result = self._step(it, seq_length, mbs)
                (stop,) = _any_rank(signals.received is not None)
                skipped.record(result.updated)
                if not result.updated:
                    log.warning("iteration %d: non-finite loss or gradients (loss=%s, grad norm="
                                "%s); step skipped (%d in a row)", it + 1, result.loss,
                                result.grad_norm, skipped.streak)
                row = step_metrics.row(result.metrics, lr=result.lr, grad_norm=result.grad_norm,
                                       seconds=time.time() - t0, tokens=self._step_tokens(it),
                                       skipped_steps=skipped.total,
                                       epoch=self.sampler.epoch_of(it + 1))
                if self.validation is not None and validation_due(
                        it + 1, cfg.train.eval_interval, self.train_iters):
                    row.update(self._evaluate(seq_length, mbs, n_mb))
                history.add({"iteration": it + 1, **row})
                metrics_log.log(it + 1, row)
                bar.update(it + 1, row)
                if skipped.aborts:
                    bar.close()
                    summary = self._summary("aborted", start, it + 1, history, t_start, None)
                    metrics_log.close(summary)
                    raise TrainingAborted(
                        f"{skipped.streak} steps in a row had non-finite loss or gradients "
                        f"(train.max_consecutive_nonfinite={skipped.limit}); last loss "
                        f"{result.loss}. Summary in {Path(cfg.run.dir) / 'train_summary.json'}")
                if checkpoints.save_after_step(it + 1):
                    self._save(it + 1, skipped.state(), checkpoints.keep_last)
                    checkpoints.saved(it + 1)
                if stop:
                    status = PREEMPTED
                    break
        bar.close()
        iteration = it + 1 if self.train_iters > start else start
        if checkpoints.save_at_end(iteration, status):
            self._save(iteration, skipped.state(), checkpoints.keep_last)
            checkpoints.saved(iteration)
        exported = None
        if checkpoints.exports(status):
            from avr_megatron.checkpoint.dist_ckpt import resolve
            from avr_megatron.training.init import export_final

            exported = export_final(resolve(self.ckpt_dir), cfg)
        summary = self._summary(status, start, iteration, history, t_start, exported)
        metrics_log.close(summary)
        with params_synced(self.chunks):  # the returned chunks hold the final weights
            pass
        return TrainResult(status, EXIT_PREEMPTED if status == PREEMPTED else 0, summary,
                           self.chunks, self.optimizer, self.scheduler)

    def _summary(self, status: str, start: int, iteration: int, history: History,
                 t_start: float, exported: str | None) -> dict:
        stats = history.summary()
        summary = {
            "stage": self.objective.name, "status": status, "iteration": iteration,
            "train_iters": self.train_iters, "started_at_iteration": start,
            "steps_per_epoch": self.sampler.steps_per_epoch,
            "bins_unused_per_epoch": self.sampler.unused_per_epoch,
            "layout": vars(self.layout), "init": self.init_source,
            "checkpoint_dir": str(self.ckpt_dir), "exported_hf": exported,
            "seconds": round(time.time() - t_start, 3),
            "tokens_per_second": stats["tokens_per_second"],
            "first": stats["first"], "last": stats["last"], "last10_mean": stats["last10_mean"],
            "data": self.data.summary(),
            "eval": self.last_eval or None,
            "valid_data": self.validation.data.summary() if self.validation else None,
            **self.extra_summary,
        }
        if is_rank0():
            _write_json(Path(self.cfg.run.dir) / "train_summary.json", summary)
        return summary
