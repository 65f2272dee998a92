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
from avr_megatron.engines.engine_args import with_platform_defaults
from avr_megatron.engines.text import eos_ids, reply_ids, reply_text
from avr_megatron.method.requests import GenerateRequest, ScoreRequest


class VllmChatEngine:
    """Offline `vllm.LLM`: each `generate` call is one batch (frontier batching). `engine_kwargs`
    are vLLM's own engine arguments (tensor_parallel_size, dtype, seed, max_num_seqs, ...)."""

    def __init__(self, model: str, *, name: str | None = None, **engine_kwargs: Any) -> None:
        from vllm import LLM

        self.name = name or str(model)
        self.llm = LLM(model=model, **with_platform_defaults(engine_kwargs, f"policy {self.name!r}"))
        self._setup(self.llm.get_tokenizer(), self.llm.llm_engine.model_config)

    def _setup(self, tokenizer: Any, model_config: Any) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        # The ids vLLM stops on (it returns the stop token in `token_ids`).
        self.eos_ids = eos_ids(tokenizer, getattr(model_config, "try_get_generation_config", lambda: {})())
        self.stats = {"calls": 0, "requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_too_long": 0}

    def close(self) -> None:
        _shutdown(self.llm)

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (benchmarks: each measured mode starts cold)."""
        self.llm.reset_prefix_cache()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[str]]:
        # Decoded here by the rule of every backend (avr_megatron.engines.text), not by vLLM's
        # incremental detokenizer (which holds back incomplete UTF-8 at the end).
        return [self._decode(samples) for samples in self.generate_token_ids(requests)]

    def _decode(self, samples: list[list[int]]) -> list[str]:
        return [reply_text(self.tokenizer, ids, self.eos_ids) for ids in samples]

    def _prepare(self, r: GenerateRequest) -> tuple[Any, Any] | None:
        """(token prompt, vllm SamplingParams) of one request, or None when the prompt leaves no
        room for an answer (its replies are then empty, counted)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = render_chat(self.tokenizer, r.messages, add_generation_prompt=True)
        room = self.max_model_len - len(ids)
        if room < 1:
            self.stats["prompt_too_long"] += r.n
            return None
        s = r.sampling
        self.stats["prompt_tokens"] += len(ids)
        # vLLM refuses n > 1 with greedy decoding; the n greedy replies are one reply repeated.
        params = SamplingParams(n=1 if s.temperature == 0 else r.n, temperature=s.temperature, top_p=s.top_p,
                                max_tokens=min(s.max_tokens, room), seed=s.seed, detokenize=False)
        return TokensPrompt(prompt_token_ids=ids), params

    def _token_ids(self, r: GenerateRequest, result: Any) -> list[list[int]]:
        """The n samples' token ids (without EOS) of one finished vLLM RequestOutput."""
        completions = sorted(result.outputs, key=lambda c: c.index)
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in completions)
        completions = completions * (r.n // len(completions))  # greedy: n copies
        return [reply_ids(c.token_ids, self.eos_ids) for c in completions]

    def _count(self, requests: Sequence[GenerateRequest]) -> None:
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        self.stats["samples"] += sum(r.n for r in requests)

    def generate_token_ids(self, requests: Sequence[GenerateRequest]) -> list[list[list[int]]]:
        """The sampled token ids (without the EOS token) of each sample of each request."""
        out: list[list[list[int]]] = [[[] for _ in range(r.n)] for r in requests]
        prompts, params, index = [], [], []
        for i, r in enumerate(requests):
            prepared = self._prepare(r)
            if prepared is not None:
                prompts.append(prepared[0])
                params.append(prepared[1])
                index.append(i)
        if prompts:
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for i, result in zip(index, results):
                out[i] = self._token_ids(requests[i], result)
        self._count(requests)
        return out


class VllmRewardEngine:
    """Offline `vllm.LLM` with the pooling runner; `score` reads the raw classifier logit."""

    def __init__(self, model: str, *, name: str | None = None, **engine_kwargs: Any) -> None:
        from vllm import LLM

        self.name = name or str(model)
        self.llm = LLM(model=model, **reward_kwargs(engine_kwargs, self.name))
        self._setup(self.llm.get_tokenizer(), self.llm.llm_engine.model_config)

    def _setup(self, tokenizer: Any, model_config: Any) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        self.stats = {"calls": 0, "requests": 0, "tokens": 0}

    def close(self) -> None:
        _shutdown(self.llm)

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes (benchmarks: each measured mode starts cold)."""
        self.llm.reset_prefix_cache()

    def _prepare(self, r: ScoreRequest) -> Any:
        from vllm.inputs import TokensPrompt

        ids = render_chat(self.tokenizer, r.messages, add_generation_prompt=False)
        if len(ids) > self.max_model_len:
            raise ValueError(f"reward model {self.name!r}: request {r.key!r} has {len(ids)} tokens, more than "
                             f"max_model_len={self.max_model_len}; lower the max_tokens of the sampling that produced it "
                             "(synth.sampling, synth.thoughts or eval.sampling)")
        self.stats["tokens"] += len(ids)
        return TokensPrompt(prompt_token_ids=ids)

    def _score(self, r: ScoreRequest, output: Any) -> float:
        # `LLM.classify` gives ClassificationOutput (.probs); `AsyncLLM.encode` the PoolingOutput
        # it is made from (.data): the same values (activation off, so raw logits).
        out = output.outputs
        probs = list(out.probs if hasattr(out, "probs") else out.data)
        if len(probs) != 1:
            raise ValueError(f"reward model {self.name!r}: expected one score per sequence (a 1-label "
                             f"classifier), got {len(probs)} for {r.key!r}")
        return float(probs[0])

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        from vllm import PoolingParams

        prompts = [self._prepare(r) for r in requests]
        if not prompts:
            return []
        outputs = self.llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        scores = [self._score(r, o) for r, o in zip(requests, outputs)]
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        return scores


def reward_kwargs(engine_kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """Engine arguments of a reward model: the pooling runner, and the pooler's activation off
    (a Bradley-Terry reward is the raw logit; vLLM's classify default is sigmoid(logit))."""
    from vllm.config import PoolerConfig

    kwargs = with_platform_defaults(engine_kwargs, f"reward model {name!r}")
    pooler = kwargs.get("pooler_config")
    if pooler is None:
        pooler = {}
    if isinstance(pooler, dict):
        if pooler.get("use_activation"):
            raise ValueError(f"reward model {name!r}: pooler_config.use_activation must stay off (the reward is "
                             "the raw logit)")
        pooler = PoolerConfig(**{**pooler, "use_activation": False})
    kwargs["pooler_config"] = pooler
    kwargs["runner"] = "pooling"
    return kwargs


def _shutdown(llm: Any) -> None:
    """Stop `vllm.LLM`'s engine-core processes now. vLLM 0.32's LLMEngine has no shutdown of its own
    (only its engine-core client has), and leaving the processes to garbage collection kept a
    benchmark process hanging at exit for minutes while a reference to the engine lived on."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
