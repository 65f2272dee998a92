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
from avr_megatron.method.requests import GenerateRequest, key_prompt_id

MARK = "[synth.rating_fallback]"


def fallback_rating(key: str, index: int) -> int:
    return 1 + int.from_bytes(hashlib.sha256(f"{key}#{index}".encode()).digest()[:4], "big") % 10


class CriticismCounter:
    """Counts criticism samples per prompt and, when `enabled`, applies the fallback."""

    def __init__(self, templates: PromptTemplates, enabled: bool) -> None:
        self.criticise = templates.criticise
        self.enabled = enabled
        self.samples: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()

    def __call__(self, requests: Sequence[GenerateRequest], outputs: list[list[str]]) -> list[list[str]]:
        for request, texts in zip(requests, outputs):
            if request.messages[-1]["content"] != self.criticise:
                continue
            prompt_id = key_prompt_id(request.key)
            self.samples[prompt_id] += len(texts)
            if not self.enabled:
                continue
            for j, text in enumerate(texts):
                if extract_rating(text) is None:
                    texts[j] = f"{text.rstrip()}\n{MARK} Score: [[{fallback_rating(request.key, j)}]]".lstrip("\n")
                    self.fired[prompt_id] += 1
        return outputs
