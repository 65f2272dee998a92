"""The transformers backend against independent references: HF `generate` (greedy) and the
sequence classifier's own forward on one unpadded sequence."""

import pytest
import torch

from avr_megatron.engines.base import ChatEngine, RewardEngine, render_chat
from avr_megatron.engines.hf import TransformersChatEngine, TransformersRewardEngine
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest

PROMPTS = ["Write a poem.", "Explain gravity to a child in a few words.", "Hi", "List three colours, please."]


def _requests(sampling, n=1, prompts=PROMPTS):
    return [GenerateRequest(f"p{i}/g", [{"role": "user", "content": p}], n, sampling.for_key(f"p{i}/g"))
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def chat(tiny_models):
    return TransformersChatEngine(tiny_models[0], device="cpu", dtype="float32", batch_size=3)


def test_greedy_equals_hf_generate(chat, tiny_models):
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=10, seed=0)
    requests = _requests(greedy)
    got = chat.generate_token_ids(requests)
    model, tok = chat.model, chat.tokenizer
    for request, ids in zip(requests, got):
        prompt = torch.tensor([render_chat(tok, request.messages, add_generation_prompt=True)])
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].tolist()
        ref = [t for t in ref if t not in (tok.eos_token_id, tok.pad_token_id)]
        assert ids[0] == ref
    assert isinstance(chat, ChatEngine)


def test_seeded_samples_do_not_depend_on_batching(chat, tiny_models):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=5)
    together = chat.generate(_requests(sampling, n=3))
    alone = [chat.generate([r])[0] for r in _requests(sampling, n=3)]
    other = TransformersChatEngine(tiny_models[0], device="cpu", dtype="float32", batch_size=64)
    assert together == alone == other.generate(_requests(sampling, n=3))
    assert all(len(set(texts)) > 1 for texts in together), "the n samples of a request must differ"
    reseeded = chat.generate(_requests(SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=6), n=3))
    assert reseeded != together


def test_prompt_longer_than_context_gives_empty_texts(chat):
    sampling = SamplingParams(max_tokens=8, seed=1)
    long = GenerateRequest("long/g", [{"role": "user", "content": "word " * 1200}], 2, sampling)
    before = chat.stats["prompt_too_long"]
    out = chat.generate([long, *_requests(sampling)[:1]])
    assert out[0] == ["", ""] and chat.stats["prompt_too_long"] == before + 2
    assert len(out[1]) == 1


def test_reward_is_the_raw_last_token_score(tiny_models):
    rm = TransformersRewardEngine(tiny_models[1], device="cpu", dtype="float32", batch_size=2)
    assert isinstance(rm, RewardEngine)
    texts = ["Short.", "A much longer answer that pads the others in its batch, " * 3,
             "It mentions <|pad|> inside the text.", "Medium length answer here."]
    requests = [ScoreRequest(f"p{i}/s", [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": t}])
                for i, t in enumerate(texts)]
    got = rm.score(requests)
    for request, value in zip(requests, got):
        ids = torch.tensor([render_chat(rm.tokenizer, request.messages, add_generation_prompt=False)])
        with torch.no_grad():
            ref = float(rm.model(input_ids=ids).logits[0, 0])
        assert value == pytest.approx(ref, abs=1e-5)
    assert len(set(got)) == len(got)
