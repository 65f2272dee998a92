"""`synth.rating_fallback` (test models only): give a criticism without a parsable `[[n]]` rating a
rating, so a random tiny model still yields trees. Off by default, never silent: each firing is
counted per prompt (and shown in the run summary), and the appended text names the option.

A criticism request is recognised by its last user turn being the recipe's criticise instruction.
The rating is a deterministic pseudo-random 1..10 from the request key and sample index (so reruns
and resumed runs agree). With the fallback on, no criticism is ever resampled or dropped.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.ratings import extract_rating
from avr_megatron.method.requests import GenerateRequest, key_prompt_id, make_key
from avr_megatron.method.thoughts import escape, extract_final_answer

MARK = "[synth.rating_fallback]"
THOUGHT_MARK = "[synth.thoughts.answer_fallback]"


def with_final_answer(text: str, templates: PromptTemplates) -> str | None:
    """`synth.thoughts.answer_fallback` (test models only): a sampled thought without a final
    answer gets one, marked, whose body is the sampled text itself; None when it has one."""
    if extract_final_answer(text, templates) is not None:
        return None
    body = escape(text.strip() or "(blank)", templates)
    return "\n".join([text.rstrip(), templates.thought_close,
                      f"{templates.final_answer_prefix} {THOUGHT_MARK}", body])


def with_rating(text: str, rating: int, parse: str) -> str:
    """`text` with a marked `[[rating]]` line appended, or put first when an earlier bracketed
    number that is no rating would still decide under `parse` ("first")."""
    line = f"{MARK} Score: [[{rating}]]"
    appended = f"{text.rstrip()}\n{line}".lstrip("\n")
    return appended if extract_rating(appended, parse) == rating else f"{line}\n{text}"


def fallback_rating(key: str, index: int) -> int:
    return 1 + int.from_bytes(hashlib.sha256(f"{key}#{index}".encode()).digest()[:4], "big") % 10


class CriticismCounter:
    """Counts criticism samples per prompt and, when `enabled`, applies the fallback."""

    def __init__(self, templates: PromptTemplates, enabled: bool, thought_fallback: bool = False,
                 rating_parse: str = "first") -> None:
        self.templates = templates
        self.rating_parse = rating_parse
        self.criticise = templates.criticise
        self.enabled = enabled
        self.thought_fallback = thought_fallback
        self.samples: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        # Thoughts given a final answer by synth.thoughts.answer_fallback, per prompt.
        self.thoughts_fired: Counter[str] = Counter()

    def __call__(self, requests: Sequence[GenerateRequest], outputs: list[list[str]]) -> list[list[str]]:
        for request, texts in zip(requests, outputs):
            if self.thought_fallback:
                self._thoughts(request, texts)
            if request.messages[-1]["content"] != self.criticise:
                continue
            prompt_id = key_prompt_id(request.key)
            self.samples[prompt_id] += len(texts)
            if not self.enabled:
                continue
            for j, text in enumerate(texts):
                if extract_rating(text, self.rating_parse) is None:
                    texts[j] = with_rating(text, fallback_rating(request.key, j), self.rating_parse)
                    self.fired[prompt_id] += 1
        return outputs

    def _thoughts(self, request: GenerateRequest, texts: list[str]) -> None:
        prompt_id = key_prompt_id(request.key)
        if request.key != make_key(prompt_id, "s2", "thoughts"):
            return
        for j, text in enumerate(texts):
            fixed = with_final_answer(text, self.templates)
            if fixed is not None:
                texts[j] = fixed
                self.thoughts_fired[prompt_id] += 1
