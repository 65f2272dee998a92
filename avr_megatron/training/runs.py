"""Training runs wired from the recipe: SFT, preference optimisation (DPO family) and reference
log-probs on the generic loop (`avr train sft|dpo`, `avr logps`; a pipeline stage runs one of
these commands: the pipeline's stages are avr_megatron.pipeline.graph's)."""

from __future__ import annotations

import logging
import os

import numpy as np

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.training.loop import TrainResult, Trainer

log = logging.getLogger(__name__)


def check_packed_layout(cfg: AvrConfig, use_te: bool) -> None:
    """What the packed-sequence path supports (checked before any work)."""
    if cfg.parallel.context_parallel_size > 1:
        raise ConfigError("parallel.context_parallel_size > 1 is not supported for packed "
                          "training data yet (THD with context parallelism needs per-sequence "
                          "padding to 2 x CP); use tensor/pipeline/data parallelism")
    if use_te and cfg.precision.fp8 is not None and \
            (cfg.train.seq_length * cfg.train.micro_batch_size) % 16:
        raise ConfigError(f"precision.fp8 needs the tokens of a microbatch "
                          f"(train.seq_length x train.micro_batch_size = "
                          f"{cfg.train.seq_length * cfg.train.micro_batch_size}) to be a "
                          "multiple of 16 (FP8 GEMM shapes)")


def _env_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _start(cfg: AvrConfig, kind: str):
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.models.llama import uses_transformer_engine
    from avr_megatron.runtime.device import on_gpu
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.config.resolve import resolve_config
    from avr_megatron.config.validate import resolve_share_prompt
    from avr_megatron.training.init import check_sources

    check_sources(cfg)
    cfg = resolve_config(cfg)  # e.g. the model's shape from model.init_from.hf; frozen
    use_te = uses_transformer_engine(cfg)
    check_packed_layout(cfg, use_te)
    # pairs' prompts computed once (data/batches.py)
    share = resolve_share_prompt(cfg, use_te, on_gpu())
    # Before process groups: fails fast on bad data. One process prepares (maps) it, the
    # others wait for it (data.prepared).
    data = load_training_data(cfg, kind, progress=_env_rank0(), share_prompt=share)
    valid = (load_training_data(cfg, kind, split="valid", progress=_env_rank0(),
                                share_prompt=share) if cfg.data.valid else None)
    layout = initialize(cfg)
    return cfg, data, valid, layout, use_te


def run_sft(cfg: AvrConfig, progress: bool = True) -> TrainResult:
    from avr_megatron.training.losses.sft import SFTObjective

    from avr_megatron.training.evaluation import Validation

    cfg, data, valid, layout, use_te = _start(cfg, "sft")
    objective = SFTObjective(vocab_size=cfg.model.vocab_size, use_te=use_te,
                             bf16=cfg.precision.bf16, chunk_size=cfg.loss.logprob_chunk_size)
    validation = Validation(valid, objective.prepare) if valid else None
    return Trainer(cfg, objective, data, layout, use_te=use_te, progress=progress,
                   validation=validation).run()


def build_reference(cfg: AvrConfig, data, *, use_te: bool):
    """The reference log-prob source named by loss.reference."""
    from avr_megatron.training.losses.common import SequenceLogprobs
    from avr_megatron.training.reference import (
        OnlineReference,
        PrecomputedReference,
        build_reference_model,
    )

    if cfg.loss.reference == "precomputed":
        return PrecomputedReference.load(cfg, data)
    chunks = build_reference_model(cfg)
    seq = SequenceLogprobs(cfg.model.vocab_size, cfg.loss.logprob_chunk_size).sequences
    return OnlineReference(chunks, seq, use_te=use_te, bf16=cfg.precision.bf16,
                           seq_length=cfg.train.seq_length,
                           bins_per_microbatch=cfg.train.micro_batch_size)


def run_dpo(cfg: AvrConfig, progress: bool = True) -> TrainResult:
    from avr_megatron.training.losses.preference import PreferenceObjective

    from avr_megatron.training.evaluation import Validation
    from avr_megatron.training.reference import PrecomputedReference

    cfg, data, valid, layout, use_te = _start(cfg, "preference")
    reference = build_reference(cfg, data, use_te=use_te)
    validation = None
    if valid is not None:  # an online reference scores any batch; stored ones are per split
        valid_ref = (PrecomputedReference.load(cfg, valid)
                     if cfg.loss.reference == "precomputed" else reference)
        validation = Validation(valid, valid_ref.attach)
    gaps = data.data.reward_gap
    gap_mean = float(np.nanmean(gaps)) if cfg.loss.reward_gap == "weight" else None
    objective = PreferenceObjective(cfg.loss, vocab_size=cfg.model.vocab_size, use_te=use_te,
                                    bf16=cfg.precision.bf16, reference=reference,
                                    gap_mean=gap_mean)
    extra = {"loss": {"type": cfg.loss.type, "beta": cfg.loss.beta,
                      "reward_gap": cfg.loss.reward_gap, "reference": cfg.loss.reference,
                      "gap_mean": gap_mean}}
    return Trainer(cfg, objective, data, layout, use_te=use_te, progress=progress,
                   extra_summary=extra, validation=validation).run()


def run_logps(cfg: AvrConfig, progress: bool = True):
    """`avr logps`: reference log-probs of every pair of data.train (and data.valid), each
    stored next to its data. Returns [(path, computed)] per split."""
    from avr_megatron.training.reference import build_reference_model, compute_store

    cfg, data, valid, layout, use_te = _start(cfg, "preference")
    chunks = build_reference_model(cfg)
    return [compute_store(cfg, td, chunks, layout, use_te=use_te, progress=progress)
            for td in (data, valid) if td is not None]
