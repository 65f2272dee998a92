"""Client for models already served by vLLM's OpenAI-compatible server (`vllm serve`), for users who
run the policy and the reward model as separate services.

- generation: `POST {base_url}/v1/chat/completions` with `n`, `seed`, `temperature`, `top_p`,
  `max_tokens` (the server applies the model's chat template), and vLLM's neutral values for the
  sampling fields we do not set (top_k, min_p, penalties): `vllm serve` otherwise takes them from
  the model's generation_config.json (its default `--generation-config auto`), which vllm.LLM
  with explicit SamplingParams does not, and the same request would sample differently;
- texts: with `tokenizer` (the served model's tokenizer directory, when it is at hand) the client
  asks for the sampled token ids (`return_token_ids`) and decodes them itself by the rule of
  every backend (avr_megatron.engines.text). vLLM's own (incremental) detokenizer drops an
  incomplete UTF-8 sequence at the end of a reply where `tokenizer.decode` writes U+FFFD, so a reply cut
  mid-character by max_tokens would read differently, and so would everything built on it (the
  criticise and improve prompts of the same tree). Without it, the server's text is used;
- reward: `POST {base_url}/classify` (vLLM's classification API, served for
  `*ForSequenceClassification` models) with the chat `messages` and `use_activation: false`, so
  the answer is the raw logit, not sigmoid(logit).

A frontier batch becomes concurrent HTTP requests (at most `max_concurrency` in flight) that the
server batches itself; `submit` sends one request (a future of its answer), for synthesis without
phase barriers (avr_megatron.synth.scheduler). Connection failures and 5xx answers are retried with backoff; a 4xx answer
raises with the server's message, except "maximum context length" rejections of generation
requests, which become empty texts (counted in `stats`) as in the offline backends.
Standard library only (urllib), so the client works in any environment; `tokenizer` alone needs transformers.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from avr_megatron.engines.text import eos_ids, generation_config_file, reply_text
from avr_megatron.method.requests import GenerateRequest, ScoreRequest

_CONTEXT_TOO_LONG = "maximum context length"


class ServerError(RuntimeError):
    pass


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class _Client:
    def __init__(self, base_url: str, model: str, *, api_key: str | None, api_key_env: str | None,
                 max_concurrency: int, timeout_s: float, max_retries: int) -> None:
        if not base_url:
            raise ValueError("base_url: the server address is required (e.g. http://127.0.0.1:8000)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: expected >= 1, got {max_concurrency}")
        self.root = _root(base_url)
        self.model = model
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self._pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()  # guards the engines' stats, updated from the pool's threads

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = self.root + path
        body = json.dumps(payload).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:2000]
                if e.code < 500 or attempt == self.max_retries:
                    raise ServerError(f"POST {url}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == self.max_retries:
                    raise ServerError(f"POST {url}: {e} (after {attempt + 1} attempts)") from None
            time.sleep(min(2.0 ** attempt, 30.0))
        raise AssertionError("unreachable")

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Future:
        """`fn(item)` on one of `max_concurrency` threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="avr-server")
        return self._pool.submit(fn, item)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return [f.result() for f in [self.submit(fn, item) for item in items]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# vLLM's defaults for the sampling fields the method does not set (SamplingParams' own), sent
# explicitly so that a model's generation_config.json cannot change them on the server only.
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}


class ServerChatEngine:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 max_concurrency: int = 64, timeout_s: float = 600.0, max_retries: int = 3,
                 name: str | None = None, tokenizer: str | None = None) -> None:
        self.client = _Client(base_url, model, api_key=api_key, api_key_env=api_key_env,
                              max_concurrency=max_concurrency, timeout_s=timeout_s, max_retries=max_retries)
        self.name = name or model
        self.tokenizer_path = tokenizer
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self.stats = {"calls": 0, "requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_too_long": 0, "server_texts": 0}

    def _decode(self, ids: list[int]) -> str:
        """Token ids -> text by the rule of every backend (avr_megatron.engines.text)."""
        with self.client.lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                # The ids the server stops on: the tokenizer's and generation_config.json's.
                self._eos_ids = eos_ids(self._tokenizer, generation_config_file(self.tokenizer_path))
        return reply_text(self._tokenizer, ids, self._eos_ids)

    def _text(self, choice: dict[str, Any]) -> tuple[str, bool]:
        """(text, whether it is the server's own) of one returned choice."""
        ids = choice.get("token_ids")
        if self.tokenizer_path and ids is not None:
            return self._decode(list(ids)), False
        return (choice.get("message") or {}).get("content") or "", True

    def close(self) -> None:
        self.client.close()

    def _one(self, r: GenerateRequest) -> tuple[list[str], dict[str, int]]:
        s = r.sampling
        # vLLM refuses n > 1 with greedy decoding; the n greedy replies are one reply repeated.
        n = 1 if s.temperature == 0 else r.n
        payload: dict[str, Any] = {
            "model": self.client.model, "messages": [dict(m) for m in r.messages], "n": n,
            "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, **NEUTRAL_SAMPLING,
        }
        if self.tokenizer_path:
            payload["return_token_ids"] = True
        if s.seed is not None:
            payload["seed"] = s.seed
        try:
            answer = self.client.post("/v1/chat/completions", payload)
        except ServerError as e:
            if _CONTEXT_TOO_LONG in str(e) and "HTTP 400" in str(e):
                return [""] * r.n, {"prompt_too_long": r.n}
            raise
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ServerError(f"request {r.key!r}: asked for n={n} choices, the server returned {len(choices)}")
        decoded = [self._text(c) for c in choices]
        texts = [text for text, _ in decoded] * (r.n // n)
        usage = answer.get("usage") or {}
        return texts, {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                       "generated_tokens": int(usage.get("completion_tokens") or 0),
                       "server_texts": sum(own for _, own in decoded)}

    def _counted(self, r: GenerateRequest) -> list[str]:
        texts, counts = self._one(r)
        with self.client.lock:
            for k, v in counts.items():
                self.stats[k] += v
            self.stats["requests"] += 1
            self.stats["samples"] += r.n
        return texts

    def submit(self, request: GenerateRequest) -> Future:
        """A future of the request's n reply texts."""
        return self.client.submit(self._counted, request)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[str]]:
        texts = self.client.map(self._counted, list(requests))
        with self.client.lock:
            self.stats["calls"] += 1
        return texts


class ServerRewardEngine:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 max_concurrency: int = 64, timeout_s: float = 600.0, max_retries: int = 3,
                 name: str | None = None) -> None:
        self.client = _Client(base_url, model, api_key=api_key, api_key_env=api_key_env,
                              max_concurrency=max_concurrency, timeout_s=timeout_s, max_retries=max_retries)
        self.name = name or model
        self.stats = {"calls": 0, "requests": 0, "tokens": 0}

    def close(self) -> None:
        self.client.close()

    def _one(self, r: ScoreRequest) -> tuple[float, int]:
        payload = {"model": self.client.model, "messages": [dict(m) for m in r.messages], "use_activation": False}
        answer = self.client.post("/classify", payload)
        data = answer.get("data") or []
        if len(data) != 1 or len(data[0].get("probs") or []) != 1:
            raise ServerError(f"request {r.key!r}: expected one sequence with one score from /classify (a 1-label "
                              f"reward model), got {json.dumps(data)[:300]}")
        usage = answer.get("usage") or {}
        return float(data[0]["probs"][0]), int(usage.get("prompt_tokens") or 0)

    def _counted(self, r: ScoreRequest) -> float:
        value, tokens = self._one(r)
        with self.client.lock:
            self.stats["requests"] += 1
            self.stats["tokens"] += tokens
        return value

    def submit(self, request: ScoreRequest) -> Future:
        """A future of the request's raw reward."""
        return self.client.submit(self._counted, request)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        scores = self.client.map(self._counted, list(requests))
        with self.client.lock:
            self.stats["calls"] += 1
        return scores
