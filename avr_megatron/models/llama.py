"""Llama-family GPT models on Megatron-Core, built from `cfg.model` / `cfg.parallel` / `cfg.precision`.

Knows nothing of losses or data: it returns the model chunks for this rank (one per virtual
pipeline stage), optionally wrapped in Float16Module for bf16. The forward pass returns
vocab-parallel logits [batch, seq, padded_vocab / TP] on the last pipeline stage.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.schema import ModelConfig, RopeScalingConfig
from avr_megatron.runtime.device import device, on_gpu


def padded_vocab_size(m: ModelConfig) -> int:
    """Vocab rounded up to a multiple of make_vocab_size_divisible_by (TP-independent)."""
    d = m.make_vocab_size_divisible_by
    return int(math.ceil(m.vocab_size / d) * d)


@lru_cache(maxsize=1)
def transformer_engine_status() -> tuple[bool, str]:
    """(usable, reason): TE needs both the package and a CUDA device."""
    try:
        spec = importlib.util.find_spec("transformer_engine")
    except (ImportError, ValueError):  # blocked (testing.import_block) or a broken package
        spec = None
    if spec is None:
        return False, "transformer_engine is not installed (the train role: requirements/train.txt)"
    if not on_gpu():
        return False, "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken install (missing cuDNN, ABI mismatch) is common
        return False, f"import transformer_engine.pytorch failed: {e}"
    return True, "available"


@lru_cache(maxsize=1)
def grad_accumulation_fusion_available() -> bool:
    """Whether Megatron's gradient-accumulation fusion (weight gradients accumulated straight
    into the fp32 `main_grad` buffers) can be on. It is one flag for every linear layer:
    Transformer Engine's linears fuse natively (they only need the `main_grad` that Megatron's
    DDP attaches), but Megatron's own ColumnParallelLinear / RowParallelLinear (the output
    layer on every spec; all linears on the local spec) call APEX's fused_weight_gradient_mlp_cuda
    kernel, and ColumnParallelLinear refuses to build without it. So: a GPU and that kernel."""
    if not on_gpu():
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (APEX, built with --cuda_ext)
    except ImportError:
        return False
    return True


def uses_transformer_engine(cfg: AvrConfig) -> bool:
    """Resolve model.transformer_impl (auto | transformer_engine | local) on this machine: the
    machine's facts are gathered here, the rules live in config/validate.py."""
    from avr_megatron.config.validate import GpuFacts, resolve_transformer_impl

    ok, reason = transformer_engine_status()
    # The GPU is asked only when the FP8 rules need it (as before: no CUDA call otherwise).
    gpu = (GpuFacts(tuple(torch.cuda.get_device_capability()), torch.version.cuda,
                    torch.cuda.get_device_name())
           if cfg.precision.fp8 is not None and on_gpu() else None)
    return resolve_transformer_impl(cfg, te_usable=ok, te_reason=reason, gpu=gpu)


def llama3_inv_freq(head_dim: int, base: float, rs: RopeScalingConfig) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling, for any factor / low / high / original
    length (Megatron-Core hard-codes low=1, high=4, original=8192)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rs.type is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _backend() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_backend()
    return "nccl" if on_gpu() else "gloo"


def transformer_config(cfg: AvrConfig, use_te: bool | None = None):
    from megatron.core.transformer import TransformerConfig

    m, p, pr = cfg.model, cfg.parallel, cfg.precision
    if use_te is None:
        use_te = uses_transformer_engine(cfg)
    gpu = on_gpu()
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        # Llama: RMSNorm, SwiGLU, no biases, RoPE (set on GPTModel).
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        bf16=pr.bf16,
        params_dtype=torch.bfloat16 if pr.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if pr.bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if pr.bf16 else torch.float32,
        # Fused kernels exist only on GPU (apex / TE / CUDA extensions).
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te,
        persist_layer_norm=use_te,
        gradient_accumulation_fusion=grad_accumulation_fusion_available(),
        cross_entropy_loss_fusion=False,
        # Initialise the full weight then slice it: same weights for any TP size; required on CPU.
        use_cpu_initialization=not gpu,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        deallocate_pipeline_outputs=True,
        # gloo pairs batched isend/irecv between the same two ranks out of order, which swaps
        # activations and gradients in the interleaved schedule; NCCL keeps Megatron's default.
        batch_p2p_comm=_backend() == "nccl",
    )
    if pr.fp8 is not None:
        kwargs.update(fp8=pr.fp8, fp8_recipe=pr.fp8_recipe,
                      fp8_amax_history_len=pr.fp8_amax_history_len,
                      fp8_amax_compute_algo=pr.fp8_amax_compute_algo, fp8_param=pr.fp8_param)
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"Megatron-Core rejected the model/parallel/precision config: {e}") from e


def layer_spec(use_te: bool):
    """TE's layer spec, or Megatron's local one with SDPA core attention (models/attention.py)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from avr_megatron.models.attention import local_layer_spec

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    return local_layer_spec()


def build_model(cfg: AvrConfig, *, wrap_fp16: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage). Needs `runtime.initialize`."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    use_te = uses_transformer_engine(cfg)
    tcfg = transformer_config(cfg, use_te)
    spec = layer_spec(use_te)
    m = cfg.model
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    inv_freq = llama3_inv_freq(head_dim, m.rotary_base, m.rope_scaling)
    if not use_te:  # RoPE by position ids (a pair's shared prompt needs it: models/positions.py)
        from avr_megatron.models.positions import PositionalRoPEGPTModel as GPTModel
    chunks = []
    for vp_stage in range(vpp or 1):
        first_chunk, last_chunk = vp_stage == 0, vp_stage == (vpp or 1) - 1
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(m),
            max_sequence_length=m.max_position_embeddings,
            pre_process=pp_rank == 0 and first_chunk,
            post_process=pp_rank == pp_size - 1 and last_chunk,
            parallel_output=True,
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=m.rotary_base,
            vp_stage=vp_stage if vpp else None,
        )
        # Our own Llama-3 frequencies (all four scaling parameters, not just the factor).
        if hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if on_gpu():
            model.to(device())
        if wrap_fp16 and cfg.precision.bf16:
            model = Float16Module(tcfg, model)
        chunks.append(model)
    return chunks


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
