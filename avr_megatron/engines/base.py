"""The engine interface the synthesis driver talks to: a chat engine samples continuations of whole
batches of conversations, a reward engine scores whole batches of `[*x, assistant y]`.

Both take the method's request objects (avr_megatron.method.requests), so frontier batching hands
every pending request of every prompt over in one call. A request's `sampling.seed` is already
the per-key seed (`SamplingParams.for_key`): engines that can seed each request separately (our
transformers loop, vLLM, a vLLM server) reproduce a sample whatever batch it travels in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from avr_megatron.method.chat import Message
from avr_megatron.method.requests import GenerateRequest, ScoreRequest


@runtime_checkable
class ChatEngine(Protocol):
    # Recorded in every record's provenance (`model`).
    name: str

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[str]]:
        """For each request, `request.n` sampled assistant replies to `request.messages`."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RewardEngine(Protocol):
    name: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """For each request, the reward model's raw score r(x, y) (a logit, no sigmoid)."""
        ...

    def close(self) -> None: ...


def render_chat(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template.

    The template already writes the BOS token, so the rendered text is tokenized without adding
    special tokens again (a doubled BOS changes what a reward model reads)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "synthesis needs chat models (set tokenizer.chat_template or use an instruct model)"
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
