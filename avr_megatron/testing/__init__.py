"""Helpers for tests and examples: tiny random Hugging Face models, a tokenizer trained in-process,
and a runner for functions under `torchrun`. Nothing here touches a model hub."""
