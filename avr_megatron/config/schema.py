"""The typed configuration tree that every recipe is loaded into.

Section names and keys follow Megatron-Core / Megatron-Bridge names where one exists, so users can
carry their habits over (`parallel.tensor_model_parallel_size`, `model.num_query_groups`, ...).
Each section is a dataclass; omegaconf rejects unknown keys and wrong types when a recipe is
merged onto it, and `avr_megatron.config.validate` checks cross-key rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunConfig:
    # Where a command reads its inputs and writes its outputs; the resolved config goes there too.
    dir: str = "runs/default"
    name: str = "avr"
    seed: int = 1234


@dataclass
class RopeScalingConfig:
    # None (no scaling) or "llama3" (Llama-3.1/3.2 frequency remapping).
    type: Optional[str] = None
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class InitFromConfig:
    # Where a model's initial weights come from: at most one of the two; neither means random
    # initialisation from run.seed (tests, smoke runs).
    # A Hugging Face checkpoint directory (converted on load by avr_megatron.conversion).
    hf: Optional[str] = None
    # A Megatron dist checkpoint: an iter_* directory or a root holding `latest` (any TP/PP).
    mcore: Optional[str] = None


@dataclass
class ModelConfig:
    # A name from avr_megatron.models.presets; keys set beside it override the preset.
    preset: Optional[str] = None
    # Initial weights of a training run (ignored when resuming from checkpoint.dir).
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    # Grouped-query attention: number of key/value heads (= num_attention_heads for MHA).
    num_query_groups: int = 2
    # Head dimension; None means hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    vocab_size: int = 512
    # The embedding and output layer are padded to a multiple of this (independent of TP, so a
    # checkpoint reshards across TP sizes); it must be divisible by the TP size.
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 1024
    rotary_base: float = 500000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    # auto: Transformer Engine spec when TE and CUDA are present, else the local spec.
    transformer_impl: str = "auto"
    # Activation recompute (Megatron names): None | full | selective.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # uniform | block (with full)
    recompute_num_layers: Optional[int] = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Interleaved (virtual) pipeline stages per rank; None disables interleaving.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # Data parallel size is what remains of the world size: world / (tp * pp * cp).


@dataclass
class PrecisionConfig:
    # bf16 parameters and activations (Float16Module); fp32 master weights in the optimizer.
    bf16: bool = False
    # FP8 through Transformer Engine: None | e4m3 | hybrid.
    fp8: Optional[str] = None
    # delayed | tensorwise | blockwise | mxfp8 (each only where the installed TE supports it).
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # Keep weights in FP8 (saves memory; needs fp8).
    fp8_param: bool = False


@dataclass
class OptimizerConfig:
    # adam (AdamW: decoupled weight decay) or sgd, through Megatron's optimizer.
    name: str = "adam"
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # Global gradient-norm clipping; 0 disables it.
    clip_grad: float = 1.0
    # Shard optimizer state across data-parallel ranks (ZeRO-1).
    use_distributed_optimizer: bool = True


@dataclass
class SchedulerConfig:
    warmup_iters: int = 0
    # constant | linear | cosine
    decay_style: str = "cosine"
    # Iterations over which the LR decays to optimizer.min_lr; None means train.train_iters.
    lr_decay_iters: Optional[int] = None


@dataclass
class TrainConfig:
    train_iters: int = 100
    micro_batch_size: int = 1
    # Sequences (SFT) or packed bins per optimizer step across all data-parallel ranks.
    global_batch_size: int = 8
    seq_length: int = 512
    log_interval: int = 1
    # A step whose loss or gradients are NaN/inf is skipped (no update) and counted; this many
    # skipped steps in a row abort the run.
    max_consecutive_nonfinite: int = 3


@dataclass
class DataConfig:
    # Training data: a Parquet/JSONL file, a directory of shards, or a glob. SFT records:
    # {"id", "messages": [{"role", "content"}, ...]}; preference records (TRL conversational):
    # {"id", "prompt": [messages], "chosen": [assistant message], "rejected": [...],
    # "reward_gap" (optional unless loss.reward_gap uses it), ...}. Extra columns are ignored.
    train: Optional[str] = None
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


@dataclass
class LossConfig:
    # Preference loss: sigmoid (DPO) | ipo. Conservative DPO: sigmoid with label_smoothing > 0.
    type: str = "sigmoid"
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
    reward_gap_scale: float = 1.0
    reward_gap_weight_max: float = 5.0
    # Reference log-probs: precomputed (by `avr logps`, read from logps.path) | online
    # (a frozen copy of the reference model runs a forward pass each step).
    reference: str = "precomputed"
    # Tokens per chunk in the vocab-parallel log-prob computation (bounds fp32 temporaries to
    # chunk x vocab / TP); 0: about 16M logits (64 MiB of fp32) per chunk.
    logprob_chunk_size: int = 0


@dataclass
class LogpsConfig:
    # Where reference log-probs are written (`avr logps`) and read (loss.reference=precomputed);
    # None: next to data.train, as <data.train>.ref_logps/.
    path: Optional[str] = None
    # The reference model; unset: model.init_from (the policy's initial weights).
    reference: InitFromConfig = field(default_factory=InitFromConfig)
    # `avr logps` writes a part file every this many microbatch rounds, and resumes after them.
    save_every: int = 64


@dataclass
class CheckpointConfig:
    # None: <run.dir>/checkpoints.
    dir: Optional[str] = None
    # Save every N iterations (0: only at the end and on SIGTERM/SIGUSR1).
    save_interval: int = 0
    # Keep the newest K complete checkpoints (0 keeps all).
    keep_last: int = 2
    # Resume from the newest checkpoint in dir when one exists.
    resume: bool = True
    save_final: bool = True
    # Hugging Face directory to export the final weights to (conversion code); None: no export.
    export_hf: Optional[str] = None


@dataclass
class LoggingConfig:
    # TensorBoard event files under <run.dir>/tensorboard.
    tensorboard: bool = True
    # Weights & Biases (needs the wandb package); None disables it.
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    progress_bar: bool = True
    # Peak dense TFLOP/s of one accelerator for the MFU estimate; None: looked up from the
    # device name (H100/H200/A100/B200); MFU is not reported on CPU.
    peak_tflops: Optional[float] = None


@dataclass
class AvrConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
