"""Cross-key rules checked when a recipe is loaded, before any work starts.

Each rule returns a list of messages that name the offending keys; all failures are reported at
once. Rules that depend on the machine (is Transformer Engine usable? which GPU?) are here too
(`resolve_transformer_impl`, `fp8_device_problem`): the model builder gathers the machine's facts
and asks them. Rules that need the world size are config/layout.py's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.layout import (batch_error, microbatch_errors, model_parallel_size,
                                        world_error)
from avr_megatron.config.schema import AvrConfig

Rule = Callable[[AvrConfig], list[str]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _choice(value, key: str, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"{key}={value!r} is not one of {list(allowed)}"]


@rule
def _model_shape(cfg: AvrConfig) -> list[str]:
    m, errs = cfg.model, []
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "max_position_embeddings",
                "make_vocab_size_divisible_by"):
        if getattr(m, key) < 1:
            errs.append(f"model.{key}={getattr(m, key)} must be >= 1")
    if errs:
        return errs
    if m.num_attention_heads % m.num_query_groups:
        errs.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={m.num_query_groups}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errs.append(f"model.hidden_size={m.hidden_size} is not divisible by "
                    f"model.num_attention_heads={m.num_attention_heads} (set model.kv_channels)")
    head_dim = m.kv_channels or (m.hidden_size // m.num_attention_heads)
    if head_dim % 2:
        errs.append(f"model head dimension {head_dim} must be even for rotary embeddings "
                    "(model.kv_channels or model.hidden_size / model.num_attention_heads)")
    errs += _choice(m.transformer_impl, "model.transformer_impl",
                    ("auto", "transformer_engine", "local"))
    errs += _choice(m.rope_scaling.type, "model.rope_scaling.type", (None, "llama3"))
    if m.rope_scaling.type == "llama3":
        rs = m.rope_scaling
        if rs.factor <= 0:
            errs.append(f"model.rope_scaling.factor={rs.factor} must be > 0")
        if not rs.high_freq_factor > rs.low_freq_factor > 0:
            errs.append("model.rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                        f"{rs.high_freq_factor} and {rs.low_freq_factor}")
    errs += _choice(m.recompute_granularity, "model.recompute_granularity",
                    (None, "full", "selective"))
    if m.recompute_granularity == "full":
        errs += _choice(m.recompute_method, "model.recompute_method", ("uniform", "block"))
        if not m.recompute_num_layers or m.recompute_num_layers < 1:
            errs.append("model.recompute_num_layers must be >= 1 with "
                        "model.recompute_granularity=full")
    elif m.recompute_method is not None:
        errs.append(f"model.recompute_method={m.recompute_method!r} needs "
                    "model.recompute_granularity=full")
    return errs


@rule
def _parallel_layout(cfg: AvrConfig) -> list[str]:
    p, m, errs = cfg.parallel, cfg.model, []
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    for key, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                   ("context_parallel_size", cp)):
        if v < 1:
            errs.append(f"parallel.{key}={v} must be >= 1")
    if errs:
        return errs
    tpk = f"parallel.tensor_model_parallel_size={tp}"
    if m.num_attention_heads % tp:
        errs.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by {tpk}")
    if m.num_query_groups % tp:
        errs.append(f"model.num_query_groups={m.num_query_groups} is not divisible by {tpk}")
    if m.ffn_hidden_size % tp:
        errs.append(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by {tpk}")
    if m.make_vocab_size_divisible_by % tp:
        errs.append(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} is "
                    f"not divisible by {tpk}")
    if pp > m.num_layers:
        errs.append(f"parallel.pipeline_model_parallel_size={pp} is larger than "
                    f"model.num_layers={m.num_layers}")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if vpp < 2:
            errs.append(f"parallel.virtual_pipeline_model_parallel_size={vpp} must be >= 2 "
                        "(or null to disable interleaving)")
        if pp < 2:
            errs.append("parallel.virtual_pipeline_model_parallel_size needs "
                        f"parallel.pipeline_model_parallel_size >= 2, got {pp}")
    chunks = pp * (vpp or 1)
    if not errs and m.num_layers % chunks:
        errs.append(f"model.num_layers={m.num_layers} is not divisible by the number of pipeline "
                    f"chunks {chunks} (parallel.pipeline_model_parallel_size={pp} x "
                    f"parallel.virtual_pipeline_model_parallel_size={vpp or 1})")
    if p.sequence_parallel and tp == 1:
        errs.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    t = cfg.train
    tokens = t.seq_length * t.micro_batch_size  # a microbatch's tokens (one THD row under TE)
    if p.sequence_parallel and tp > 1 and tokens % tp:
        errs.append(f"parallel.sequence_parallel=true splits each microbatch's tokens over the "
                    f"TP ranks: train.seq_length x train.micro_batch_size = {tokens} is not "
                    f"divisible by {tpk}")
    if vpp is not None and pp > 1 and t.micro_batch_size >= 1 and \
            t.global_batch_size % t.micro_batch_size == 0 and \
            (t.global_batch_size // t.micro_batch_size) % pp:
        errs.append(f"interleaved pipelining (parallel.virtual_pipeline_model_parallel_size="
                    f"{vpp}) runs a multiple of parallel.pipeline_model_parallel_size={pp} "
                    f"microbatches per step and data-parallel rank: train.global_batch_size / "
                    f"train.micro_batch_size = {t.global_batch_size // t.micro_batch_size} is "
                    f"not a multiple of {pp}")
    return errs


@rule
def _precision(cfg: AvrConfig) -> list[str]:
    pr, errs = cfg.precision, []
    errs += _choice(pr.fp8, "precision.fp8", (None, "e4m3", "hybrid"))
    errs += _choice(pr.fp8_recipe, "precision.fp8_recipe",
                    ("delayed", "tensorwise", "blockwise", "mxfp8"))
    errs += _choice(pr.fp8_amax_compute_algo, "precision.fp8_amax_compute_algo",
                    ("max", "most_recent"))
    if pr.fp8_amax_history_len < 1:
        errs.append(f"precision.fp8_amax_history_len={pr.fp8_amax_history_len} must be >= 1")
    if pr.fp8_param and pr.fp8 is None:
        errs.append("precision.fp8_param=true needs precision.fp8 (e4m3 or hybrid)")
    if pr.fp8 is not None and cfg.model.transformer_impl == "local":
        errs.append(f"precision.fp8={pr.fp8!r} needs Transformer Engine, but "
                    "model.transformer_impl='local'")
    return errs


@rule
def _training(cfg: AvrConfig) -> list[str]:
    o, sch, t, errs = cfg.optimizer, cfg.scheduler, cfg.train, []
    errs += _choice(o.name, "optimizer.name", ("adam", "sgd"))
    errs += _choice(sch.decay_style, "scheduler.decay_style", ("constant", "linear", "cosine"))
    if o.lr <= 0:
        errs.append(f"optimizer.lr={o.lr} must be > 0")
    if not 0 <= o.min_lr <= o.lr:
        errs.append(f"optimizer.min_lr={o.min_lr} must be in [0, optimizer.lr={o.lr}]")
    if cfg.ddp.overlap_param_gather and not o.use_distributed_optimizer:
        errs.append("ddp.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true "
                    "(parameters are all-gathered from the optimizer's shards)")
    if o.clip_grad < 0:
        errs.append(f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)")
    for key in ("train_iters", "micro_batch_size", "global_batch_size", "seq_length",
                "log_interval"):
        if getattr(t, key) < 1:
            errs.append(f"train.{key}={getattr(t, key)} must be >= 1")
    if t.micro_batch_size >= 1 and (err := batch_error(t)):
        errs.append(err)
    if sch.warmup_iters < 0:
        errs.append(f"scheduler.warmup_iters={sch.warmup_iters} must be >= 0")
    if t.seq_length > cfg.model.max_position_embeddings:
        errs.append(f"train.seq_length={t.seq_length} exceeds "
                    f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    return errs


@rule
def _init_from(cfg: AvrConfig) -> list[str]:
    errs = []
    for key, init in (("model.init_from", cfg.model.init_from),
                      ("logps.reference", cfg.logps.reference)):
        if init.hf is not None and init.mcore is not None:
            errs.append(f"{key}.hf and {key}.mcore are both set; choose one")
    return errs


@rule
def _data(cfg: AvrConfig) -> list[str]:
    d, errs = cfg.data, []
    errs += _choice(d.overlong, "data.overlong", ("drop", "truncate"))
    errs += _choice(d.sft_loss_on, "data.sft_loss_on", ("all", "last"))
    if d.num_epochs is not None and d.num_epochs < 1:
        errs.append(f"data.num_epochs={d.num_epochs} must be >= 1 (or null)")
    errs += _choice(d.prepared, "data.prepared", ("auto", "required", "in_memory"))
    if d.prepare_workers is not None and d.prepare_workers < 1:
        errs.append(f"data.prepare_workers={d.prepare_workers} must be >= 1 (or null: every "
                    "core)")
    t = cfg.train
    if t.eval_interval is not None and t.eval_interval < 0:
        errs.append(f"train.eval_interval={t.eval_interval} must be >= 0 (or null)")
    if t.eval_iters is not None and t.eval_iters < 1:
        errs.append(f"train.eval_iters={t.eval_iters} must be >= 1 (or null: all of data.valid)")
    if cfg.train.max_consecutive_nonfinite < 1:
        errs.append(f"train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite} "
                    "must be >= 1")
    return errs


@rule
def _loss(cfg: AvrConfig) -> list[str]:
    lo, errs = cfg.loss, []
    errs += _choice(lo.type, "loss.type", ("sigmoid", "ipo"))
    errs += _choice(lo.reward_gap, "loss.reward_gap", ("none", "margin", "weight", "soft_label"))
    errs += _choice(lo.reference, "loss.reference", ("precomputed", "online"))
    if not lo.beta > 0:
        errs.append(f"loss.beta={lo.beta} must be > 0")
    if not 0 <= lo.label_smoothing < 0.5:
        errs.append(f"loss.label_smoothing={lo.label_smoothing} must be in [0, 0.5)")
    if lo.label_smoothing > 0 and lo.type != "sigmoid":
        errs.append(f"loss.label_smoothing={lo.label_smoothing} (conservative DPO) needs "
                    f"loss.type=sigmoid, got {lo.type!r}")
    if lo.reward_gap == "soft_label":
        if lo.type != "sigmoid":
            errs.append(f"loss.reward_gap=soft_label needs loss.type=sigmoid, got {lo.type!r}")
        if lo.label_smoothing > 0:
            errs.append("loss.reward_gap=soft_label replaces loss.label_smoothing; set "
                        "loss.label_smoothing=0")
    if lo.sft_weight < 0:
        errs.append(f"loss.sft_weight={lo.sft_weight} must be >= 0")
    if not lo.reward_gap_scale > 0:
        errs.append(f"loss.reward_gap_scale={lo.reward_gap_scale} must be > 0")
    if not lo.reward_gap_weight_max > 0:
        errs.append(f"loss.reward_gap_weight_max={lo.reward_gap_weight_max} must be > 0")
    if lo.logprob_chunk_size < 0:
        errs.append(f"loss.logprob_chunk_size={lo.logprob_chunk_size} must be >= 0 (0: auto)")
    if cfg.logps.save_every < 1:
        errs.append(f"logps.save_every={cfg.logps.save_every} must be >= 1")
    return errs


@rule
def _checkpoint_and_logging(cfg: AvrConfig) -> list[str]:
    c, errs = cfg.checkpoint, []
    if c.save_interval < 0:
        errs.append(f"checkpoint.save_interval={c.save_interval} must be >= 0 (0: only at the "
                    "end and on SIGTERM/SIGUSR1)")
    if c.keep_last < 0:
        errs.append(f"checkpoint.keep_last={c.keep_last} must be >= 0 (0 keeps all)")
    if cfg.logging.peak_tflops is not None and not cfg.logging.peak_tflops > 0:
        errs.append(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (or null)")
    return errs


SYNTH_BACKENDS = ("transformers", "vllm", "server")


@rule
def _synth(cfg: AvrConfig) -> list[str]:
    """Shape of the synth section. That the models are set is checked by the synth commands
    (recipes that only train need no synth models)."""
    s, errs = cfg.synth, []
    for role in ("policy", "reward"):
        e, key = getattr(s, role), f"synth.{role}"
        errs += _choice(e.backend, f"{key}.backend", SYNTH_BACKENDS)
        errs += _choice(e.dtype, f"{key}.dtype", ("auto", "float32", "bfloat16", "float16"))
        for name in ("batch_size", "tensor_parallel_size", "max_concurrency"):
            if getattr(e, name) < 1:
                errs.append(f"{key}.{name}={getattr(e, name)} must be >= 1")
        if not 0 < e.gpu_memory_utilization <= 1:
            errs.append(f"{key}.gpu_memory_utilization={e.gpu_memory_utilization} must be in (0, 1]")
        if e.max_model_len is not None and e.max_model_len < 1:
            errs.append(f"{key}.max_model_len={e.max_model_len} must be >= 1 (or null)")
        if e.timeout_s <= 0:
            errs.append(f"{key}.timeout_s={e.timeout_s} must be > 0")
        if e.base_url is not None and not e.base_url.startswith(("http://", "https://")):
            errs.append(f"{key}.base_url={e.base_url!r} must start with http:// or https://")
        if e.backend in ("vllm", "server"):
            from avr_megatron.engines.engine_args import check, names_from_source

            errs += check(e.engine_args, key, names_from_source())
    if s.policy.backend == s.reward.backend == "vllm":
        share = s.policy.gpu_memory_utilization + s.reward.gpu_memory_utilization
        if share > 1:
            errs.append(f"synth.policy.gpu_memory_utilization + synth.reward.gpu_memory_utilization = {share:.3g} > 1: "
                        "both vLLM engines share the GPUs")
    errs += _choice(s.input.format, "synth.input.format", ("auto", "jsonl", "parquet", "disk", "hub"))
    if s.input.limit is not None and s.input.limit < 1:
        errs.append(f"synth.input.limit={s.input.limit} must be >= 1 (or null)")
    errs += _choice(s.output_format, "synth.output_format", ("parquet", "jsonl"))
    errs += _choice(s.scheduling, "synth.scheduling", ("auto", "async", "barrier"))
    errs += _choice(s.rating_parse, "synth.rating_parse", ("first", "last"))
    errs += _choice(s.pairs.gating, "synth.pairs.gating", ("reference", "independent"))
    if not 0.0 <= s.pairs.valid_fraction < 1.0:
        errs.append(f"synth.pairs.valid_fraction={s.pairs.valid_fraction} must be in [0, 1): the fraction of "
                    "prompts held out as a validation split")
    errs += _choice(s.stage2.start, "synth.stage2.start", ("chosen", "sample"))
    if s.pairs.mix_source_chosen and s.input.fields.chosen is None:
        errs.append("synth.pairs.mix_source_chosen=true needs synth.input.fields.chosen (the chosen column of the "
                    "source preference set); for a prompt-only set, set synth.pairs.mix_source_chosen=false")
    for key, value in (("synth.stage1.k", s.stage1.k), ("synth.stage1.m", s.stage1.m),
                       ("synth.stage2.k", s.stage2.k), ("synth.stage2.m", s.stage2.m),
                       ("synth.stage2.max_rounds", s.stage2.max_rounds),
                       ("synth.stage2.beam_width", s.stage2.beam_width),
                       ("synth.thoughts.num_samples", s.thoughts.num_samples),
                       ("synth.max_rating_tries", s.max_rating_tries),
                       ("synth.max_answer_tries", s.max_answer_tries), ("synth.chunk_size", s.chunk_size),
                       ("synth.chunks_in_flight", s.chunks_in_flight)):
        if value < 1:
            errs.append(f"{key}={value} must be >= 1")
    if s.thoughts.num_samples == 1:
        errs.append("synth.thoughts.num_samples=1: a best-vs-worst pair needs at least 2 thoughts per prompt")
    # The method's own rules (sampling, filters, prompt wording), named by the recipe's keys.
    from avr_megatron.method.filters import filter_problems
    from avr_megatron.method.prompts import PromptTemplates
    from avr_megatron.method.requests import sampling_problems

    errs += sampling_problems(dataclasses.asdict(s.sampling), "synth.sampling")
    errs += sampling_problems(dataclasses.asdict(s.thoughts), "synth.thoughts")
    errs += filter_problems(dataclasses.asdict(s.filters), "synth.filters")
    try:
        PromptTemplates.from_dict(dict(s.templates), "synth.templates")
    except ValueError as e:
        errs.append(str(e))
    return errs


def check_stage2_start(cfg: AvrConfig) -> None:
    """synth.stage2.start=chosen (the reference) needs the source set's chosen answers. Checked by
    `avr synth stage2` and, for its stage, by `avr pipeline` before any stage runs (not by
    validate_config: recipes that never run stage 2 need no chosen column)."""
    if cfg.synth.stage2.start == "chosen" and cfg.synth.input.fields.chosen is None:
        raise ConfigError("synth.stage2.start=chosen: the stage-2 search starts from the source set's chosen answer "
                          "(the reference), but synth.input.fields.chosen is not set; name the chosen column, or "
                          "set synth.stage2.start=sample to start from a fresh answer of the stage-1 model")


@rule
def _eval(cfg: AvrConfig) -> list[str]:
    """Shape of the eval section (that eval.model is set is checked by `avr eval`)."""
    e, errs = cfg.eval, []
    if e.rounds < 0:
        errs.append(f"eval.rounds={e.rounds} must be >= 0 (0: no test-time refinement)")
    if e.limit is not None and e.limit < 1:
        errs.append(f"eval.limit={e.limit} must be >= 1 (or null)")
    if e.max_answer_tries < 1:
        errs.append(f"eval.max_answer_tries={e.max_answer_tries} must be >= 1")
    if not 0 < e.confidence < 1:
        errs.append(f"eval.confidence={e.confidence} must be in (0, 1), e.g. 0.95")
    if e.tie_margin < 0:
        errs.append(f"eval.tie_margin={e.tie_margin} must be >= 0")
    from avr_megatron.method.requests import sampling_problems

    return errs + sampling_problems(dataclasses.asdict(e.sampling), "eval.sampling")


@rule
def _pipeline(cfg: AvrConfig) -> list[str]:
    """Shape of the pipeline section; which stage names exist is checked by `avr pipeline`,
    which builds and validates every stage's config before the first stage starts."""
    p, errs = cfg.pipeline, []
    errs += _choice(p.executor, "pipeline.executor", ("local", "inline", "slurm"))
    if p.synth_shards < 1:
        errs.append(f"pipeline.synth_shards={p.synth_shards} must be >= 1")
    for name, override in p.stages.items():
        if not isinstance(override, dict):
            errs.append(f"pipeline.stages.{name} must be a mapping of overrides in the recipe's "
                        f"layout (e.g. {{train: {{train_iters: 100}}}}), got {override!r}")
    for role in ("synth", "train"):
        env = getattr(p.envs, role)
        for key in ("python", "container_image"):
            if getattr(env, key) is not None and not str(getattr(env, key)).strip():
                errs.append(f"pipeline.envs.{role}.{key} is empty: set it or use null")
    return errs


def _slurm_world(res) -> int:
    per_node = res.ntasks_per_node if res.ntasks_per_node is not None else (res.gpus_per_node or 1)
    return res.nodes * per_node


# Slurm --time: M:S, H:M:S, D-H, D-H:M, D-H:M:S (bare minutes are refused, see below).
_SLURM_TIME = re.compile(r"^(\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|"
                         r"\d+-\d+:\d{2}:\d{2})$")


@rule
def _launch_slurm(cfg: AvrConfig) -> list[str]:
    s, errs = cfg.launch.slurm, []
    errs += _choice(s.tunnel, "launch.slurm.tunnel", ("local", "ssh"))
    if s.tunnel == "ssh":
        if not s.ssh_host:
            errs.append("launch.slurm.tunnel=ssh needs launch.slurm.ssh_host")
        if not s.job_dir:
            errs.append("launch.slurm.tunnel=ssh needs launch.slurm.job_dir (a directory on the "
                        "cluster)")
    elif s.ssh_host or s.ssh_user or s.ssh_identity:
        errs.append("launch.slurm.ssh_host/ssh_user/ssh_identity need launch.slurm.tunnel=ssh")
    for name in ("synth", "train", "cpu"):
        r, key = getattr(s, name), f"launch.slurm.{name}"
        if str(r.time).isdigit():
            # YAML 1.1 reads an unquoted 4:00:00 as the base-60 number 14400 (minutes to Slurm).
            errs.append(f"{key}.time={r.time!r} is a bare number: quote the time in the recipe "
                        f"(time: \"4:00:00\"); unquoted H:MM:SS is read as a base-60 integer")
        elif not _SLURM_TIME.match(str(r.time)):
            errs.append(f"{key}.time={r.time!r} is not a Slurm time (HH:MM:SS or D-HH:MM:SS)")
        if r.nodes < 1:
            errs.append(f"{key}.nodes={r.nodes} must be >= 1")
        if r.gpus_per_node < 0:
            errs.append(f"{key}.gpus_per_node={r.gpus_per_node} must be >= 0")
        if r.ntasks_per_node is not None and r.ntasks_per_node < 1:
            errs.append(f"{key}.ntasks_per_node={r.ntasks_per_node} must be >= 1 (or null)")
        if r.cpus_per_task is not None and r.cpus_per_task < 1:
            errs.append(f"{key}.cpus_per_task={r.cpus_per_task} must be >= 1 (or null)")
    if s.signal_seconds < 0:
        errs.append(f"launch.slurm.signal_seconds={s.signal_seconds} must be >= 0 (0: no signal)")
    if s.preempt_retries < 0:
        errs.append(f"launch.slurm.preempt_retries={s.preempt_retries} must be >= 0")
    for i, mount in enumerate(s.container_mounts):
        if ":" not in mount:
            errs.append(f"launch.slurm.container_mounts[{i}]={mount!r} must be SRC:DST[:FLAGS]")
    envs = cfg.pipeline.envs
    if s.container_mounts and not (envs.synth.container_image or envs.train.container_image):
        errs.append("launch.slurm.container_mounts need a container image "
                    "(pipeline.envs.synth/train.container_image)")
    if s.tunnel == "ssh":
        for role in ("synth", "train"):
            env = getattr(envs, role)
            if not (env.container_image or env.python):
                # The default, this machine's interpreter path, means nothing on the cluster.
                errs.append(f"launch.slurm.tunnel=ssh needs pipeline.envs.{role}.container_image "
                            f"or pipeline.envs.{role}.python (the {role} environment's Python on "
                            "the cluster)")
    if errs or cfg.pipeline.executor != "slurm":
        return errs
    # Layout checks that need the world size, which launch.slurm.train fixes on Slurm.
    world, model = _slurm_world(s.train), model_parallel_size(cfg.parallel)
    if model >= 1:  # else the parallel sizes' own rule reports it
        err = world_error(cfg.parallel, world, f"launch.slurm.train gives {world} processes "
                          f"({s.train.nodes} node(s) x {world // s.train.nodes} per node)")
        if err:
            errs.append(err)
        elif cfg.train.micro_batch_size >= 1:
            errs += microbatch_errors(cfg, world // model, f" (launch.slurm.train: {world} "
                                      f"processes / TP x PP x CP = {model})")
    for role in ("policy", "reward"):
        e = getattr(cfg.synth, role)
        if e.backend == "vllm" and s.synth.gpus_per_node and \
                e.tensor_parallel_size > s.synth.gpus_per_node:
            errs.append(f"synth.{role}.tensor_parallel_size={e.tensor_parallel_size} exceeds "
                        f"launch.slurm.synth.gpus_per_node={s.synth.gpus_per_node} (one synthesis "
                        "shard runs on one node)")
    return errs


def _non_finite_floats(node: Any, prefix: str = "") -> list[str]:
    """Every float key (nested sections, lists and dicts included) whose value is NaN or
    infinite. No key of ours gives infinity a meaning (no "unbounded" float setting), and a NaN
    compares false with every bound, so the range rules below would blame another key (e.g.
    `optimizer.min_lr` for `optimizer.lr=nan`)."""
    if dataclasses.is_dataclass(node):
        items = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, dict):
        items = ((str(k), v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(node))
    else:
        return ([f"{prefix}={node} must be a finite number"]
                if isinstance(node, float) and not math.isfinite(node) else [])
    errs = []
    for name, value in items:
        key = f"{prefix}{name}" if name.startswith("[") or not prefix else f"{prefix}.{name}"
        errs += _non_finite_floats(value, key)
    return errs


def validate_config(cfg: AvrConfig) -> AvrConfig:
    # Non-finite floats first and alone: with a NaN or inf in play, range rules that compare two
    # keys would name the wrong one.
    errors = _non_finite_floats(cfg) or [msg for check in RULES for msg in check(cfg)]
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


class GpuFacts(NamedTuple):
    """What the FP8 rules need to know about this machine's GPU."""
    capability: tuple[int, int]
    cuda_version: str | None
    name: str


def resolve_transformer_impl(cfg: AvrConfig, *, te_usable: bool, te_reason: str,
                             gpu: GpuFacts | None = None) -> bool:
    """Whether the model uses Transformer Engine, from model.transformer_impl (auto |
    transformer_engine | local) and whether TE is usable here (`te_reason` says why not); a
    ConfigError when a setting needs TE (FP8, context or sequence parallelism) without it, or
    this GPU (None: no GPU) cannot run the FP8 recipe."""
    impl = cfg.model.transformer_impl
    if impl == "local":
        use_te = False
    elif impl == "transformer_engine":
        if not te_usable:
            raise ConfigError(f"model.transformer_impl='transformer_engine' but {te_reason}")
        use_te = True
    else:
        use_te = te_usable
    pr, p = cfg.precision, cfg.parallel
    if pr.fp8 is not None and not use_te:
        raise ConfigError(f"precision.fp8={pr.fp8!r} needs Transformer Engine, but "
                          f"{'model.transformer_impl=local' if impl == 'local' else te_reason}")
    if p.context_parallel_size > 1 and not use_te:
        raise ConfigError("parallel.context_parallel_size > 1 needs Transformer Engine attention "
                          f"({te_reason})")
    if p.sequence_parallel and not use_te:
        raise ConfigError("parallel.sequence_parallel=true needs Transformer Engine norms "
                          f"({te_reason})")
    if pr.fp8 is not None and gpu is not None:
        problem = fp8_device_problem(pr.fp8_recipe, gpu.capability, gpu.cuda_version)
        if problem:
            raise ConfigError(f"precision.fp8={pr.fp8!r} with precision.fp8_recipe="
                              f"{pr.fp8_recipe!r} on {gpu.name}: {problem}")
    return use_te


def resolve_share_prompt(cfg: AvrConfig, use_te: bool, on_gpu: bool = False) -> bool:
    """Whether preference pairs compute their shared prompt once
    (`avr_megatron.data.batches.collate(share_prompt=True)`; data.share_prompt: None = where
    supported), given whether the model uses Transformer Engine; a ConfigError when
    data.share_prompt=true cannot be honoured. Supported: the local spec's attention, which takes
    the shared-prefix mask (TE's THD attention and flash varlen cannot express it), without
    pipeline parallelism (stages exchange fixed-shape activations; context parallelism needs TE,
    so the local spec has none). The default (null) also leaves it off on a GPU in bf16 without
    attention dropout: there the local spec runs all sequences of a micro-batch in one flash
    varlen call, which cannot take the shared-prefix mask, and a per-sequence loop of kernel
    launches is not known to pay for the ~10% of tokens saved (unmeasured: no GPU here);
    data.share_prompt=true still turns it on there."""
    pp = cfg.parallel.pipeline_model_parallel_size
    supported = not use_te and pp == 1
    varlen = on_gpu and cfg.precision.bf16 and cfg.model.attention_dropout == 0
    if cfg.data.share_prompt and not supported:
        why = ("Transformer Engine's THD attention cannot attend another sequence's prefix "
               "(set model.transformer_impl=local, or data.share_prompt=null)" if use_te else
               f"parallel.pipeline_model_parallel_size={pp}: pipeline stages need fixed "
               "micro-batch shapes (use 1, or data.share_prompt=null)")
        raise ConfigError(f"data.share_prompt=true is not supported here: {why}")
    if cfg.data.share_prompt is None:
        return supported and not varlen
    return bool(cfg.data.share_prompt)


def fp8_device_problem(fp8_recipe: str, capability: tuple[int, int],
                       cuda_version: str | None) -> str | None:
    """Why this GPU cannot run the FP8 recipe, or None. The device rules of Transformer Engine
    2.20 (transformer_engine/pytorch/quantization.py `_compute_*_support`), checked (through
    resolve_transformer_impl) when the model is configured on the GPU itself, before any data or
    weights are loaded: a recipe is loaded on login nodes without a GPU, so load_config cannot."""
    cc = tuple(capability)
    cuda = tuple(int(x) for x in (cuda_version or "0.0").split(".")[:2])
    cc_text = f"compute capability {cc[0]}.{cc[1]}"
    if cc < (8, 9):
        return f"FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU has {cc_text}"
    if fp8_recipe == "mxfp8" and not (10, 0) <= cc < (12, 0):
        return (f"mxfp8 needs a Blackwell data-centre GPU (compute capability 10.x; TE has no "
                f"MXFP8 GEMMs before 10.0 or on 12.x); this GPU has {cc_text}: use delayed, "
                "tensorwise or blockwise")
    if fp8_recipe == "blockwise" and (cc < (9, 0) or cuda < (12, 9)):
        return (f"blockwise FP8 needs compute capability >= 9.0 and CUDA >= 12.9; this GPU has "
                f"{cc_text}, torch is built for CUDA {cuda_version}")
    if cc < (9, 0) and cuda < (12, 1):
        return f"FP8 on Ada ({cc_text}) needs CUDA >= 12.1; torch is built for CUDA {cuda_version}"
    return None
