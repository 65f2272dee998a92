"""vLLM backend (the real one on clusters): offline `vllm.LLM` engines in this process.

Generation renders each conversation with the model's chat template ourselves (the same token ids
the transformers backend and the trainer see) and hands vLLM token prompts with one
`SamplingParams` per request (n, temperature, top_p, max_tokens and the per-key seed, which vLLM
honours per request). The reward model runs with `runner="pooling"` and `llm.classify`, with the
pooler activation switched off (`use_activation=False`, in the pooler config and in every
request): a Bradley-Terry reward is the raw logit, while vLLM's classify default returns
sigmoid(logit).

Prompts longer than the context are answered with empty texts (counted in `stats`), as the
transformers backend does: the method drops or resamples blank outputs instead of the whole run
failing on one long prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avr_megatron.engines.base import render_chat
from avr_megatron.method.requests import GenerateRequest, ScoreRequest


def _engine_kwargs(tensor_parallel_size: int, dtype: str, max_model_len: int | None, enforce_eager: bool,
                   gpu_memory_utilization: float, seed: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        tensor_parallel_size=tensor_parallel_size, dtype=dtype, enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization, seed=seed,
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(extra or {})
    return kwargs


class VllmChatEngine:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, name: str | None = None,
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        from vllm import LLM

        self.name = name or str(model)
        self.llm = LLM(model=model, **_engine_kwargs(tensor_parallel_size, dtype, max_model_len, enforce_eager,
                                                     gpu_memory_utilization, seed, engine_kwargs))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.eos_ids = _eos_ids(self.tokenizer, self.llm.llm_engine.model_config)
        self.stats = {"calls": 0, "requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_too_long": 0}

    def close(self) -> None:
        _shutdown(self.llm)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[str]]:
        # Decoded here, like the transformers backend, not by vLLM's incremental detokenizer
        # (which holds back incomplete UTF-8 at the end): both backends give the same text for
        # the same tokens.
        return [[self.tokenizer.decode(ids, skip_special_tokens=True) for ids in samples]
                for samples in self.generate_token_ids(requests)]

    def generate_token_ids(self, requests: Sequence[GenerateRequest]) -> list[list[list[int]]]:
        """The sampled token ids (without the EOS token) of each sample of each request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out: list[list[list[int]]] = [[[] for _ in range(r.n)] for r in requests]
        prompts, params, index = [], [], []
        for i, r in enumerate(requests):
            ids = render_chat(self.tokenizer, r.messages, add_generation_prompt=True)
            room = self.max_model_len - len(ids)
            if room < 1:
                self.stats["prompt_too_long"] += r.n
                continue
            s = r.sampling
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            # vLLM refuses n > 1 with greedy decoding; the n greedy replies are one reply repeated.
            params.append(SamplingParams(n=1 if s.temperature == 0 else r.n, temperature=s.temperature, top_p=s.top_p,
                                         max_tokens=min(s.max_tokens, room), seed=s.seed, detokenize=False))
            index.append(i)
            self.stats["prompt_tokens"] += len(ids)
        if prompts:
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for i, result in zip(index, results):
                completions = sorted(result.outputs, key=lambda c: c.index)
                self.stats["generated_tokens"] += sum(len(c.token_ids) for c in completions)
                completions = completions * (requests[i].n // len(completions))  # greedy: n copies
                out[i] = [[t for t in c.token_ids if t not in self.eos_ids] for c in completions]
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        self.stats["samples"] += sum(r.n for r in requests)
        return out


class VllmRewardEngine:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, name: str | None = None,
                 engine_kwargs: dict[str, Any] | None = None) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.name = name or str(model)
        kwargs = _engine_kwargs(tensor_parallel_size, dtype, max_model_len, enforce_eager,
                                gpu_memory_utilization, seed, engine_kwargs)
        kwargs.setdefault("pooler_config", PoolerConfig(use_activation=False))
        self.llm = LLM(model=model, runner="pooling", **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.stats = {"calls": 0, "requests": 0, "tokens": 0}

    def close(self) -> None:
        _shutdown(self.llm)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        prompts = []
        for r in requests:
            ids = render_chat(self.tokenizer, r.messages, add_generation_prompt=False)
            if len(ids) > self.max_model_len:
                raise ValueError(f"reward model {self.name!r}: request {r.key!r} has {len(ids)} tokens, more than "
                                 f"max_model_len={self.max_model_len}; lower the max_tokens of the sampling that produced it "
                                 "(synth.sampling, synth.thoughts or eval.sampling)")
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            self.stats["tokens"] += len(ids)
        if not prompts:
            return []
        outputs = self.llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        scores = []
        for r, o in zip(requests, outputs):
            probs = list(o.outputs.probs)
            if len(probs) != 1:
                raise ValueError(f"reward model {self.name!r}: expected one score per sequence (a 1-label "
                                 f"classifier), got {len(probs)} for {r.key!r}")
            scores.append(float(probs[0]))
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        return scores


def _eos_ids(tokenizer: Any, model_config: Any) -> set[int]:
    """EOS ids vLLM stops on (it returns the stop token in `token_ids`; we drop it, as the
    transformers backend does)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model_config, "try_get_generation_config", lambda: {})() or {}
    extra = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if isinstance(extra, int):
        eos.add(extra)
    elif isinstance(extra, (list, tuple)):
        eos.update(int(t) for t in extra)
    return eos


def _shutdown(llm: Any) -> None:
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
