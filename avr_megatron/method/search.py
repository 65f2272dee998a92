"""Stage 2 data: greedy refinement search with the stage-1 model.

Each round criticises the current best answer(s) k times and improves each criticism m times,
scores every improvement, and keeps the best. The search stops after the first round whose best
improvement is not strictly better than the best answer so far (a failed round), when a round
yields no scored improvement at all, or after `max_rounds`.

`beam_width` b > 1 (beyond the paper; b = 1 is the paper) expands the top b improvements of the
last round instead of only the best; the stop rule still compares the round's best with the best
so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from avr_megatron.method import _check
from avr_megatron.method.chat import Message
from avr_megatron.method.expansion import Expansion, RefinerBase
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.tree import Provenance, RefinementNode, RefinementTree, rewards_of

STAGE = "s2"
STOP_NO_IMPROVEMENT = "no_improvement"
STOP_NO_CANDIDATES = "no_candidates"
STOP_MAX_ROUNDS = "max_rounds"
STOP_REASONS = (STOP_NO_IMPROVEMENT, STOP_NO_CANDIDATES, STOP_MAX_ROUNDS)


@dataclass
class SearchRound:
    """One round: which answers were expanded, what came out, what was kept. Criticisms,
    improvements and rewards live on the tree nodes named here."""

    round: int
    parent_ids: list[str]
    # Scored improvements of this round, parent by parent in tree order.
    candidate_ids: list[str]
    # The answers carried into the next round (best first); empty when the round failed.
    kept_ids: list[str]
    previous_best: float
    best_reward: float | None
    improved: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round, "parent_ids": list(self.parent_ids), "candidate_ids": list(self.candidate_ids),
            "kept_ids": list(self.kept_ids), "previous_best": self.previous_best,
            "best_reward": self.best_reward, "improved": self.improved,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "round") -> SearchRound:
        names = ("round", "parent_ids", "candidate_ids", "kept_ids", "previous_best", "best_reward", "improved")
        d = _check.mapping(d, where, names)

        def ids(name: str) -> list[str]:
            return [_check.string(v, f"{where}.{name}[{i}]") for i, v in enumerate(_check.sequence(d[name], f"{where}.{name}"))]

        if not isinstance(d["improved"], bool):
            raise ValueError(f"{where}.improved: expected a bool, got {d['improved']!r}")
        return cls(
            round=_check.integer(d["round"], f"{where}.round", minimum=1),
            parent_ids=ids("parent_ids"), candidate_ids=ids("candidate_ids"), kept_ids=ids("kept_ids"),
            previous_best=_check.number(d["previous_best"], f"{where}.previous_best"),
            best_reward=_check.optional_number(d["best_reward"], f"{where}.best_reward"),
            improved=d["improved"],
        )


@dataclass
class SearchResult:
    tree: RefinementTree
    rounds: list[SearchRound]
    best_id: str
    stop_reason: str
    max_rounds: int
    beam_width: int = 1

    def __post_init__(self) -> None:
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"search {self.tree.prompt_id!r}: stop_reason: expected one of {STOP_REASONS}, got {self.stop_reason!r}")
        self.tree.find(self.best_id)

    @property
    def best(self) -> RefinementNode:
        return self.tree.find(self.best_id)

    @property
    def ended_on_failed_round(self) -> bool:
        return bool(self.rounds) and not self.rounds[-1].improved

    def to_dict(self) -> dict[str, Any]:
        return {
            "tree": self.tree.to_dict(), "rounds": [r.to_dict() for r in self.rounds], "best_id": self.best_id,
            "stop_reason": self.stop_reason, "max_rounds": self.max_rounds, "beam_width": self.beam_width,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "search") -> SearchResult:
        d = _check.mapping(d, where, ("tree", "rounds", "best_id", "stop_reason", "max_rounds", "beam_width"))
        rounds = _check.sequence(d["rounds"], f"{where}.rounds")
        return cls(
            tree=RefinementTree.from_dict(d["tree"], f"{where}.tree"),
            rounds=[SearchRound.from_dict(r, f"{where}.rounds[{i}]") for i, r in enumerate(rounds)],
            best_id=_check.string(d["best_id"], f"{where}.best_id"),
            stop_reason=_check.string(d["stop_reason"], f"{where}.stop_reason"),
            max_rounds=_check.integer(d["max_rounds"], f"{where}.max_rounds", minimum=1),
            beam_width=_check.integer(d["beam_width"], f"{where}.beam_width", minimum=1),
        )


class RefinementSearch(RefinerBase):
    """The search for one prompt as a request/result state machine (same protocol as
    Stage1TreeBuilder: `pending()`, `feed(results)`, `done`, then `result`)."""

    def __init__(
        self,
        prompt_id: str,
        x: Sequence[Message],
        y0: str | None = None,
        r0: float | None = None,
        *,
        k: int = 2,
        m: int = 2,
        max_rounds: int = 5,
        beam_width: int = 1,
        provenance: Provenance,
        templates: PromptTemplates = PromptTemplates(),
        max_rating_tries: int = 5,
        max_answer_tries: int = 5,
        rating_parse: str = "first",
    ) -> None:
        self.max_rounds = _check.integer(max_rounds, "max_rounds", minimum=1)
        self.beam_width = _check.integer(beam_width, "beam_width", minimum=1)
        self.rounds: list[SearchRound] = []
        self.stop_reason: str | None = None
        self._current: Expansion | None = None
        self._best: RefinementNode | None = None
        super().__init__(
            prompt_id, x, y0, r0, stage=STAGE, k=k, m=m, provenance=provenance, templates=templates,
            max_rating_tries=max_rating_tries, max_answer_tries=max_answer_tries,
            rating_parse=rating_parse,
        )

    @property
    def done(self) -> bool:
        return self.failure is not None or self.stop_reason is not None

    @property
    def result(self) -> SearchResult:
        if not self.done:
            raise RuntimeError(f"{self.name}: the search is not finished yet")
        if self.failure is not None or self._tree is None or self._best is None or self.stop_reason is None:
            raise RuntimeError(f"{self.name}: no search result ({self.failure})")
        return SearchResult(self._tree, list(self.rounds), self._best.id, self.stop_reason, self.max_rounds, self.beam_width)

    def _start(self) -> None:
        assert self.root is not None
        self._best = self.root
        self._current = self._expansion([self.root], 1)

    def _progress(self) -> None:
        current = self._current
        if current is None or not current.finished or self.stop_reason is not None:
            return
        assert self._best is not None
        if self._best.reward is None:  # round 1 finished before y0's score came back
            return
        self._current = None
        round_no = len(self.rounds) + 1
        candidates = current.new_nodes
        previous = self._best.reward
        rewards = rewards_of(candidates)
        order = sorted(range(len(candidates)), key=lambda i: (-rewards[i], i))
        top = candidates[order[0]] if candidates else None
        improved = top is not None and rewards[order[0]] > previous
        kept = [candidates[i] for i in order[: self.beam_width]] if improved else []
        self.rounds.append(
            SearchRound(
                round=round_no,
                parent_ids=[p.id for p in current.parents],
                candidate_ids=[c.id for c in candidates],
                kept_ids=[c.id for c in kept],
                previous_best=previous,
                best_reward=None if top is None else top.reward,
                improved=improved,
            )
        )
        if top is None:
            self.stop_reason = STOP_NO_CANDIDATES
        elif not improved:
            self.stop_reason = STOP_NO_IMPROVEMENT
        else:
            self._best = top
            if round_no == self.max_rounds:
                self.stop_reason = STOP_MAX_ROUNDS
            else:
                self._current = self._expansion(kept, round_no + 1)
