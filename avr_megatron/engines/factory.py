"""Build the engines a recipe names (`synth.policy`, `synth.reward`); heavy imports happen here,
only for the backend in use."""

from __future__ import annotations

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import SynthEngineConfig
from avr_megatron.engines.base import ChatEngine, RewardEngine


def _require(cfg: SynthEngineConfig, where: str) -> str:
    if not cfg.model:
        what = "the served model name" if cfg.backend == "server" else "a local model directory or hub name"
        raise ConfigError(f"{where}.model is not set: give {what} (e.g. {where}.model=path/to/model)")
    if cfg.backend == "server" and not cfg.base_url:
        raise ConfigError(f"{where}.base_url is not set: {where}.backend=server needs the server address "
                          "(e.g. http://127.0.0.1:8000)")
    return cfg.model


def _vllm_kwargs(cfg: SynthEngineConfig, seed: int, where: str) -> dict:
    from avr_megatron.engines.engine_args import vllm_kwargs

    return dict(name=cfg.name, **vllm_kwargs(cfg, seed, where))


def _server_kwargs(cfg: SynthEngineConfig) -> dict:
    return dict(api_key_env=cfg.api_key_env, max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s,
                name=cfg.name)


def build_chat_engine(cfg: SynthEngineConfig, seed: int, where: str = "synth.policy", *,
                      asynchronous: bool = False) -> ChatEngine:
    """The policy engine; `asynchronous`: one that takes single requests (`submit`), for
    scheduling without phase barriers (vllm: vLLM's AsyncLLM instead of vllm.LLM)."""
    model = _require(cfg, where)
    if cfg.backend == "transformers":
        from avr_megatron.engines.hf import TransformersChatEngine

        return TransformersChatEngine(model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                                      seed=seed, name=cfg.name)
    if cfg.backend == "vllm":
        if asynchronous:
            from avr_megatron.engines.vllm_async import AsyncVllmChatEngine

            return AsyncVllmChatEngine(model, **_vllm_kwargs(cfg, seed, where))
        from avr_megatron.engines.vllm_offline import VllmChatEngine

        return VllmChatEngine(model, **_vllm_kwargs(cfg, seed, where))
    if cfg.backend == "server":
        from avr_megatron.engines.server import ServerChatEngine

        from pathlib import Path

        # Served by its directory name and the directory is here: decode replies as the other
        # backends do (avr_megatron.engines.server).
        tokenizer = model if Path(model).is_dir() else None
        return ServerChatEngine(cfg.base_url or "", model, tokenizer=tokenizer, **_server_kwargs(cfg))
    raise ConfigError(f"{where}.backend={cfg.backend!r} is not one of ['transformers', 'vllm', 'server']")


def build_reward_engine(cfg: SynthEngineConfig, seed: int, where: str = "synth.reward", *,
                        asynchronous: bool = False) -> RewardEngine:
    model = _require(cfg, where)
    if cfg.backend == "transformers":
        from avr_megatron.engines.hf import TransformersRewardEngine

        return TransformersRewardEngine(model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                                        name=cfg.name)
    if cfg.backend == "vllm":
        if asynchronous:
            from avr_megatron.engines.vllm_async import AsyncVllmRewardEngine

            return AsyncVllmRewardEngine(model, **_vllm_kwargs(cfg, seed, where))
        from avr_megatron.engines.vllm_offline import VllmRewardEngine

        return VllmRewardEngine(model, **_vllm_kwargs(cfg, seed, where))
    if cfg.backend == "server":
        from avr_megatron.engines.server import ServerRewardEngine

        return ServerRewardEngine(cfg.base_url or "", model, **_server_kwargs(cfg))
    raise ConfigError(f"{where}.backend={cfg.backend!r} is not one of ['transformers', 'vllm', 'server']")
