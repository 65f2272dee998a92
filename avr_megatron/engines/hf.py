"""transformers backend (CPU and small runs): batched chat sampling with our own decode loop, and an
AutoModelForSequenceClassification reward model.

Why our own loop instead of `model.generate`: `generate` draws every row of a batch from one global
RNG, so a sample would depend on which other requests share its batch. Here each sample has its
own `torch.Generator` seeded from the request's per-key seed (and the sample index), so frontier
batching, chunking and resuming reproduce the same texts. Prompts are left-padded with position
ids that skip the padding, and decoding uses the KV cache.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass

from avr_megatron.engines.base import render_chat
from avr_megatron.engines.text import eos_ids, reply_text
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest

DTYPES = ("auto", "float32", "bfloat16", "float16")


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request whose per-key seed is `seed` (63-bit, deterministic)."""
    digest = hashlib.sha256(f"{seed}#{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def _device(name: str) -> str:
    if name == "auto":
        from avr_megatron.runtime.device import device

        return str(device())
    return name


def _display_name(model: str, name: str | None) -> str:
    return name or str(model)


def _sample_token(logits, params: SamplingParams, generator) -> int:
    """One token from fp32 `logits` [vocab]: greedy at temperature 0, else temperature + top-p."""
    import torch

    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Row:
    request: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    max_new: int


class TransformersChatEngine:
    """`generate(requests)`: `request.n` replies per request, batched `batch_size` rows at a time
    (rows sorted by prompt length so padding stays small)."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32", batch_size: int = 32,
                 seed: int = 0, name: str | None = None, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.name = _display_name(model, name)
        self.device = _device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code).to(self.device).eval()
        cfg = self.model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        eos = eos_ids(self.tokenizer, self.model.generation_config)
        if not eos:
            raise ValueError(f"{self.name}: neither the tokenizer nor the generation config names an EOS token")
        self.eos_ids = eos
        # transformers 5.24 names the KV cache `cache`; earlier 5.x releases `past_key_values`.
        params = inspect.signature(self.model.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(eos)
        # Seeds for requests that carry none (sampling.seed is None): reproducible per engine.
        self._rng = random.Random(seed)
        self._torch = torch
        self.stats = {"calls": 0, "requests": 0, "samples": 0, "prompt_tokens": 0, "generated_tokens": 0,
                      "prompt_too_long": 0}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[str]]:
        return [[reply_text(self.tokenizer, ids, self.eos_ids) for ids in samples]
                for samples in self.generate_token_ids(requests)]

    def generate_token_ids(self, requests: Sequence[GenerateRequest]) -> list[list[list[int]]]:
        """The sampled token ids (without the EOS token) of each sample of each request."""
        rows: list[_Row] = []
        out: list[list[list[int]]] = [[[] for _ in range(r.n)] for r in requests]
        for i, r in enumerate(requests):
            prompt = render_chat(self.tokenizer, r.messages, add_generation_prompt=True)
            max_new = r.sampling.max_tokens
            if self.max_positions is not None:
                max_new = min(max_new, self.max_positions - len(prompt))
            for j in range(r.n):
                base = r.sampling.seed if r.sampling.seed is not None else self._rng.getrandbits(62)
                if max_new < 1:  # the prompt fills the context: an empty reply, counted
                    self.stats["prompt_too_long"] += 1
                    continue
                rows.append(_Row(i, j, prompt, r.sampling, sample_seed(base, j), max_new))
        order = sorted(range(len(rows)), key=lambda k: (len(rows[k].prompt), k))
        for start in range(0, len(order), self.batch_size):
            batch = [rows[k] for k in order[start:start + self.batch_size]]
            for row, ids in zip(batch, self._decode(batch)):
                out[row.request][row.sample] = ids
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        self.stats["samples"] += sum(r.n for r in requests)
        return out

    def _decode(self, rows: list[_Row]) -> list[list[int]]:
        torch = self._torch
        n, width = len(rows), max(len(r.prompt) for r in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[b, width - len(row.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(row.seed) for row in rows]
        generated: list[list[int]] = [[] for _ in rows]
        finished = [False] * n
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            for _ in range(max(r.max_new for r in rows)):
                logits = out.logits[:, -1, :].float().cpu()
                step = []
                for b, row in enumerate(rows):
                    if finished[b]:
                        step.append(self.pad_id)
                        continue
                    token = _sample_token(logits[b], row.params, generators[b])
                    if token in self.eos_ids:
                        finished[b] = True
                    else:
                        generated[b].append(token)
                        finished[b] = len(generated[b]) >= row.max_new
                    step.append(token)
                if all(finished):
                    break
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=torch.tensor(step, device=self.device)[:, None], attention_mask=mask,
                                 position_ids=positions, use_cache=True,
                                 **{self._cache_name: getattr(out, self._cache_name)})
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in rows)
        self.stats["generated_tokens"] += sum(len(g) for g in generated)
        return generated


class TransformersRewardEngine:
    """`score(requests)`: the raw score (no sigmoid) a 1-label AutoModelForSequenceClassification
    gives the last token of `[*x, assistant y]` under the reward model's chat template."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32", batch_size: int = 32,
                 name: str | None = None, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.name = _display_name(model, name)
        self.device = _device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code).to(self.device).eval()
        labels = getattr(self.model.config, "num_labels", None)
        if labels != 1:
            raise ValueError(f"reward model {self.name!r}: expected a 1-label sequence classifier (a Bradley-Terry "
                             f"reward model), got num_labels={labels}")
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._torch = torch
        self.stats = {"calls": 0, "requests": 0, "tokens": 0}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        seqs = [render_chat(self.tokenizer, r.messages, add_generation_prompt=False) for r in requests]
        for r, s in zip(requests, seqs):
            if self.max_positions is not None and len(s) > self.max_positions:
                raise ValueError(f"reward model {self.name!r}: request {r.key!r} has {len(s)} tokens, more than "
                                 f"max_position_embeddings={self.max_positions}; lower the max_tokens of the sampling that "
                                 "produced it (synth.sampling, synth.thoughts or eval.sampling)")
        out = [0.0] * len(requests)
        order = sorted(range(len(seqs)), key=lambda k: (len(seqs[k]), k))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for k, value in zip(idx, self._score([seqs[k] for k in idx])):
                out[k] = value
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        self.stats["tokens"] += sum(len(s) for s in seqs)
        return out

    def _score(self, seqs: list[list[int]]) -> list[float]:
        """Right-padded batch; the score is read at each sequence's own last token, found from
        its length (not by searching for the pad id, which a generated text may contain)."""
        torch = self._torch
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
        last = torch.tensor([len(s) - 1 for s in seqs])
        with torch.inference_mode():
            ids, mask = ids.to(self.device), mask.to(self.device)
            head = getattr(self.model, "score", None)
            if isinstance(head, torch.nn.Module):
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = hidden[torch.arange(n), last.to(self.device)]
                values = head(pooled)[:, 0]
            else:  # heads without a `score` layer: the model's own last-token pooling
                values = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
        return [float(v) for v in values.float().cpu()]
