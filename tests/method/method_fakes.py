"""A tiny deterministic fake engine for driving the method's state machines in tests: every text
and reward is a pure function of (seed, request key, sample index, text), so runs reproduce."""

from __future__ import annotations

import hashlib
import re

from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import GenerateRequest, ScoreRequest
from avr_megatron.method.search import RefinementSearch, SearchResult
from avr_megatron.method.tree import Provenance

PROVENANCE = Provenance("policy-test", "rm-test")
X = [{"role": "user", "content": "Explain why the sky is blue."}]


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FakeEngine:
    """`p_no_rating`: chance a criticism has no `[[n]]`; `p_blank`: chance an improvement is blank.
    Rewards are uniform in [-3, 3) per text, so improvements win or lose at random."""

    def __init__(self, seed: int = 0, p_no_rating: float = 0.0, p_blank: float = 0.0,
                 templates: PromptTemplates = PromptTemplates()) -> None:
        self.seed, self.p_no_rating, self.p_blank, self.templates = seed, p_no_rating, p_blank, templates
        self.generate_calls: list[list[GenerateRequest]] = []
        self.score_calls: list[list[ScoreRequest]] = []

    def sample(self, request: GenerateRequest, j: int) -> str:
        last = request.messages[-1]["content"]
        tag = f"{request.key}#{j}"
        if last == self.templates.criticise:
            if unit(self.seed, "norating", tag) < self.p_no_rating:
                return f"A review without a verdict ({tag})."
            rating = 1 + int(unit(self.seed, "rating", tag) * 10)
            return f"Strengths and weaknesses of the answer ({tag}). Score: [[{rating}]]"
        if last == self.templates.improve:
            if unit(self.seed, "blank", tag) < self.p_blank:
                return "  \n"
            return f"Improved answer ({tag})."
        return f"First answer ({tag})."

    def generate(self, requests: list[GenerateRequest]) -> list[list[str]]:
        self.generate_calls.append(list(requests))
        return [[self.sample(r, j) for j in range(r.n)] for r in requests]

    def reward(self, text: str) -> float:
        return round(6 * unit(self.seed, "reward", text) - 3, 6)

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        self.score_calls.append(list(requests))
        return [self.reward(r.messages[-1]["content"]) for r in requests]


_KEY = re.compile(r"/r(\d+)/b(\d+)/c(\d+)/improve#(\d+)")


class Scripted(FakeEngine):
    """Improvement rewards come from a table keyed by node id ("r1/b0/c0/y1"); unlisted ones get
    `default`. Texts embed their key, so the id is recoverable from the text."""

    def __init__(self, table, default=-10.0, **kw):
        super().__init__(**kw)
        self.table, self.default = table, default

    def reward(self, text):
        m = _KEY.search(text)
        if m is None:
            return 0.0  # y0
        r, b, c, j = m.groups()
        return self.table.get(f"r{r}/b{b}/c{c}/y{j}", self.default)


def search(engine: FakeEngine, **kw) -> SearchResult:
    """Run a search of prompt 'q' from y0 = 'first' (reward 0 under Scripted) to the end."""
    args = dict(k=2, m=2, provenance=PROVENANCE)
    args.update(kw)
    s = RefinementSearch("q", X, "first", None, **args)
    run_frontier([s], engine.generate, engine.score)
    return s.result
