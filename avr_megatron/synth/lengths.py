"""Prompt lengths in tokens, measured before any work: a prompt that does not fit the policy's or
the reward model's context is an invalid input row (listed with its reason), not an error in the
middle of a chunk that would stop the shard again on every rerun.

A prompt fits when, under each model's own chat template and tokenizer, it leaves room for a
full answer of the stage's `max_tokens`:

    policy:  len(x + generation prompt)          + max_tokens <= policy context
    reward:  len([*x, assistant ""]) (+ y0 given)  + max_tokens <= reward-model context

(the reward model scores `[*x, assistant y]` for answers y of up to max_tokens policy tokens, so
the same count is assumed in its tokenizer). Contexts are `max_model_len` when set (vllm), else
the model's `max_position_embeddings`. A text longer than `context x longest token` characters
cannot fit and is refused without being tokenized (a 10 MB prompt costs a length check).
Server engines are checked when `model` is a local directory (their tokenizer is needed); for a
served name they are not, and the server's own limit applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig, SynthEngineConfig
from avr_megatron.method.chat import Message, message

log = logging.getLogger(__name__)


@dataclass
class _Model:
    role: str  # "policy" | "reward"
    tokenizer: Any
    context: int
    longest_token: int  # characters of the longest vocabulary entry: tokens >= chars / this


def _context(cfg: SynthEngineConfig, model_dir: str) -> int | None:
    if cfg.max_model_len is not None:
        return cfg.max_model_len
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    text = getattr(hf, "get_text_config", lambda: hf)()
    return getattr(text, "max_position_embeddings", None)


def _tokenizer_source(cfg: SynthEngineConfig) -> str | None:
    """Where the engine's tokenizer comes from, or None when it is not on this machine."""
    extra = getattr(cfg, "engine_args", None) or {}
    source = extra.get("tokenizer") if isinstance(extra, dict) else None
    source = source or cfg.model
    if cfg.backend == "server" and not (source and Path(source).is_dir()):
        return None
    return source


def _load(role: str, cfg: SynthEngineConfig) -> _Model | None:
    if cfg.model is None:  # engines handed in directly (tests, benchmarks)
        return None
    source = _tokenizer_source(cfg)
    if source is None:
        log.warning("synth.%s: prompt lengths are not checked up front (a served model without a "
                    "local tokenizer); the server's own context limit applies", role)
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        context = _context(cfg, cfg.model if Path(cfg.model).is_dir() or cfg.backend != "server"
                           else source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"synth.{role}.model={cfg.model!r}: cannot load its tokenizer and "
                          f"config to measure prompts ({type(e).__name__}: {str(e)[:300]})"
                          ) from None
    if context is None:
        log.warning("synth.%s: the model config names no context length (max_position_embeddings)"
                    "; set synth.%s.max_model_len to have prompt lengths checked", role, role)
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return _Model(role, tokenizer, int(context), max(longest, 1))


class PromptLengthCheck:
    """`check(record)` -> None, or (field, reason) for a prompt that does not fit. Tokenizers
    load on first use (after the input was found)."""

    def __init__(self, cfg: AvrConfig, max_tokens: int):
        self.cfg, self.max_tokens = cfg, max_tokens
        f = cfg.synth.input.fields
        self.prompt_field, self.answer_field = f.prompt, f.answer
        self._models: list[_Model] | None = None

    @property
    def models(self) -> list[_Model]:
        if self._models is None:
            self._models = [m for role in ("policy", "reward")
                            if (m := _load(role, getattr(self.cfg.synth, role))) is not None]
        return self._models

    def limits(self) -> dict[str, Any]:
        """What decides which prompts fit (part of the output's fingerprint)."""
        return {"max_tokens": self.max_tokens, **{m.role: m.context for m in self.models}}

    def _fits(self, model: _Model, messages: list[Message], generation: bool,
              budget: int) -> str | None:
        """None when `messages` render to at most `budget` tokens, else how long they are. The
        characters alone decide when they prove the count is over (no tokenization then)."""
        chars = sum(len(m["content"]) for m in messages)
        if chars > budget * model.longest_token:
            return f"over {budget} tokens ({chars} characters)"
        from avr_megatron.engines.base import render_chat

        n = len(render_chat(model.tokenizer, messages, add_generation_prompt=generation))
        return None if n <= budget else f"{n} tokens"

    def __call__(self, record) -> tuple[str | None, str] | None:
        x: list[Message] = list(record.x)
        y0 = getattr(record, "y0", None)
        for model in self.models:
            room = f", with room for a {self.max_tokens}-token answer"
            if model.role == "policy":
                size = self._fits(model, x, True, model.context - self.max_tokens)
            else:
                size = self._fits(model, [*x, message("assistant", "")], False,
                                  model.context - self.max_tokens)
            if size is not None:
                return self.prompt_field, (f"prompt too long for the {model.role} model: {size}; "
                                           f"its context is {model.context} tokens{room}")
            if model.role == "reward" and y0 is not None:
                size = self._fits(model, [*x, message("assistant", y0)], False, model.context)
                if size is not None:
                    return self.answer_field, (f"prompt with its answer too long for the reward "
                                               f"model: {size}; its context is {model.context} "
                                               "tokens")
        return None
