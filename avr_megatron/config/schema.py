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
class ModelConfig:
    # A name from avr_megatron.models.presets; keys set beside it override the preset.
    preset: Optional[str] = None
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


@dataclass
class AvrConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
