"""Shared fixtures: tiny random HF models built in-process (no hub)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(policy dir, reward dir): a tiny random chat Llama and a 1-label reward model."""
    from avr_megatron.testing.tiny_hf import make_tiny_llama, make_tiny_reward_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    tok = train_tiny_tokenizer(root / "tok")
    return str(make_tiny_llama(root / "policy", tok)), str(make_tiny_reward_model(root / "reward", tok))


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A folder with the toy SFT data (sft.jsonl), pairs (pairs.jsonl) and tokenizer/."""
    from avr_megatron.testing.toy_data import main as toy_main

    root = tmp_path_factory.mktemp("toy")
    toy_main([str(root)])
    return root
