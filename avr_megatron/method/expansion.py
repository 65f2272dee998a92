"""One refinement round over a set of answers, shared by stage 1 (one round of y0) and the stage-2
search (one round per step of the beam): k criticisms of each answer, resampled until a rating
parses (`rating_parse`, see avr_megatron.method.ratings; at most `max_rating_tries` samples per
criticism, then the criticism is dropped), m improvements per surviving criticism, a reward for
each non-blank improvement.

`RefinerBase` adds what both machines do first: generate y0 when none is given (resampling a
blank one) and score it when its reward is unknown; scoring y0 runs alongside round 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from avr_megatron.method import _check
from avr_megatron.method.chat import Message, check_text, message, validate_conversation
from avr_megatron.method.machine import RequestMachine
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.ratings import RATING_PARSES, extract_rating
from avr_megatron.method.requests import GenerateRequest, Request, SamplingParams, ScoreRequest, make_key
from avr_megatron.method.rewards import check_reward
from avr_megatron.method.tree import ROOT_ID, Provenance, RefinementNode, RefinementTree

# Counter names kept on each expanded node.
CRITICISM_RESAMPLES = "criticism_resamples"
CRITICISMS_DROPPED = "criticisms_dropped"
IMPROVEMENTS_BLANK = "improvements_blank"


def _bump(node: RefinementNode, name: str, n: int = 1) -> None:
    node.counters[name] = node.counters.get(name, 0) + n


class Expansion:
    """Expands `parents` by one round. Requests go out through `issue`; `on_done` runs once every
    request of the round is answered, after the new children are attached to their parents in
    (criticism index, sample index) order."""

    def __init__(
        self,
        issue: Callable[[Request, Callable[[Any], None]], None],
        *,
        prompt_id: str,
        stage: str,
        x: list[Message],
        parents: Sequence[RefinementNode],
        round_no: int,
        k: int,
        m: int,
        templates: PromptTemplates,
        sampling: SamplingParams,
        max_rating_tries: int,
        on_done: Callable[[], None],
        rating_parse: str = "first",
    ) -> None:
        self._issue_raw = issue
        self.prompt_id, self.stage, self.x = prompt_id, stage, x
        self.parents = list(parents)
        self.round_no, self.k, self.m = round_no, k, m
        self.templates, self.sampling, self.max_rating_tries = templates, sampling, max_rating_tries
        self.rating_parse = rating_parse
        self._on_done = on_done
        self._open = 0
        self._new: list[list[tuple[tuple[int, int], RefinementNode]]] = [[] for _ in self.parents]
        self.finished = False

    def start(self) -> None:
        for b in range(len(self.parents)):
            self._ask_criticisms(b, list(range(self.k)), 1)

    @property
    def new_nodes(self) -> list[RefinementNode]:
        """The improvements of this round, parent by parent, in attachment order."""
        return [node for per_parent in self._new for _, node in sorted(per_parent, key=lambda item: item[0])]

    def _key(self, b: int, *parts: str) -> str:
        return make_key(self.prompt_id, self.stage, f"r{self.round_no}", f"b{b}", *parts)

    def _request(self, request: Request, handler: Callable[[Any], None]) -> None:
        self._open += 1

        def answered(value: Any) -> None:
            self._open -= 1
            handler(value)
            if self._open == 0:
                self._finish()

        self._issue_raw(request, answered)

    def _ask_criticisms(self, b: int, slots: list[int], tries: int) -> None:
        key = self._key(b, "crit", f"t{tries}")
        messages = self.templates.criticise_turns(self.x, self.parents[b].answer)
        request = GenerateRequest(key, messages, len(slots), self.sampling.for_key(key))
        self._request(request, lambda texts: self._on_criticisms(b, slots, tries, key, texts))

    def _on_criticisms(self, b: int, slots: list[int], tries: int, key: str, texts: list[str]) -> None:
        parent, missing = self.parents[b], []
        for j, (slot, text) in enumerate(zip(slots, texts)):
            rating = extract_rating(text, self.rating_parse)
            if rating is not None:
                self._ask_improvements(b, slot, text, rating, tries, f"{key}#{j}")
            elif tries < self.max_rating_tries:
                missing.append(slot)
            else:
                _bump(parent, CRITICISMS_DROPPED)
        if missing:
            _bump(parent, CRITICISM_RESAMPLES, len(missing))
            self._ask_criticisms(b, missing, tries + 1)

    def _ask_improvements(self, b: int, slot: int, criticism: str, rating: int, tries: int, ckey: str) -> None:
        key = self._key(b, f"c{slot}", "improve")
        messages = self.templates.improve_turns(self.x, self.parents[b].answer, criticism)
        request = GenerateRequest(key, messages, self.m, self.sampling.for_key(key))

        def on_improvements(texts: list[str]) -> None:
            for j, text in enumerate(texts):
                if not text.strip():
                    _bump(self.parents[b], IMPROVEMENTS_BLANK)
                    continue
                node = RefinementNode(
                    id=f"r{self.round_no}/b{b}/c{slot}/y{j}",
                    answer=text,
                    round=self.round_no,
                    criticism=criticism,
                    rating=rating,
                    criticism_index=slot,
                    criticism_tries=tries,
                    criticism_key=ckey,
                    sample_key=f"{key}#{j}",
                )
                self._new[b].append(((slot, j), node))
                self._ask_score(b, slot, j, node)

        self._request(request, on_improvements)

    def _ask_score(self, b: int, slot: int, j: int, node: RefinementNode) -> None:
        key = self._key(b, f"c{slot}", f"y{j}", "score")
        request = ScoreRequest(key, [*(dict(m) for m in self.x), message("assistant", node.answer)])

        def on_score(value: float) -> None:
            node.reward = value

        self._request(request, on_score)

    def _finish(self) -> None:
        for parent, new in zip(self.parents, self._new):
            parent.children.extend(node for _, node in sorted(new, key=lambda item: item[0]))
        self.finished = True
        self._on_done()


class RefinerBase(RequestMachine):
    """y0 (generated when None, resampled while blank up to `max_answer_tries`) and its reward
    (scored when `r0` is None), then `_start` (subclasses run their rounds from there)."""

    def __init__(
        self,
        prompt_id: str,
        x: Sequence[Message],
        y0: str | None,
        r0: float | None,
        *,
        stage: str,
        k: int,
        m: int,
        provenance: Provenance,
        templates: PromptTemplates,
        max_rating_tries: int,
        max_answer_tries: int,
        rating_parse: str = "first",
    ) -> None:
        super().__init__(f"prompt {prompt_id!r}")
        _check.string(prompt_id, "prompt_id")
        self.prompt_id, self.stage = prompt_id, stage
        self.x = validate_conversation(x, f"prompt {prompt_id!r}: x", last_role="user")
        self.k = _check.integer(k, "k", minimum=1)
        self.m = _check.integer(m, "m", minimum=1)
        self.max_rating_tries = _check.integer(max_rating_tries, "max_rating_tries", minimum=1)
        self.max_answer_tries = _check.integer(max_answer_tries, "max_answer_tries", minimum=1)
        if rating_parse not in RATING_PARSES:
            raise ValueError(f"rating_parse: expected one of {', '.join(RATING_PARSES)}, got {rating_parse!r}")
        self.rating_parse = rating_parse
        if not isinstance(provenance, Provenance):
            raise ValueError(f"prompt {prompt_id!r}: provenance: expected Provenance")
        if not isinstance(templates, PromptTemplates):
            raise ValueError(f"prompt {prompt_id!r}: templates: expected PromptTemplates")
        self.provenance, self.templates = provenance, templates
        # Set when the machine gave up (e.g. "y0_blank"); the machine is then done without a tree.
        self.failure: str | None = None
        self._tree: RefinementTree | None = None
        if r0 is not None:
            r0 = check_reward(r0, f"prompt {prompt_id!r}: r0")
        if y0 is None:
            if r0 is not None:
                raise ValueError(f"prompt {prompt_id!r}: r0 given without y0")
            self._ask_y0(1)
        else:
            root = RefinementNode(ROOT_ID, check_text(y0, f"prompt {prompt_id!r}: y0"), reward=r0)
            self._begin(root)

    @property
    def root(self) -> RefinementNode | None:
        return None if self._tree is None else self._tree.root

    def _ask_y0(self, tries: int) -> None:
        key = make_key(self.prompt_id, self.stage, "y0", f"t{tries}")
        request = GenerateRequest(key, [dict(m) for m in self.x], 1, self.provenance.sampling.for_key(key))

        def on_y0(texts: list[str]) -> None:
            if texts[0].strip():
                self._begin(RefinementNode(ROOT_ID, texts[0], sample_key=f"{key}#0"))
            elif tries < self.max_answer_tries:
                self._ask_y0(tries + 1)
            else:
                self.failure = "y0_blank"

        self._issue(request, on_y0)

    def _begin(self, root: RefinementNode) -> None:
        self._tree = RefinementTree(
            self.prompt_id, self.x, root, self.provenance, self.templates, self.k, self.m
        )
        if root.reward is None:
            key = make_key(self.prompt_id, self.stage, "y0", "score")

            def on_score(value: float) -> None:
                root.reward = value
                self._progress()

            messages = [*(dict(m) for m in self.x), message("assistant", root.answer)]
            self._issue(ScoreRequest(key, messages), on_score)
        self._start()

    def _expansion(self, parents: Sequence[RefinementNode], round_no: int) -> Expansion:
        assert self._tree is not None
        expansion = Expansion(
            self._issue,
            prompt_id=self.prompt_id,
            stage=self.stage,
            x=self.x,
            parents=parents,
            round_no=round_no,
            k=self.k,
            m=self.m,
            templates=self.templates,
            sampling=self.provenance.sampling,
            max_rating_tries=self.max_rating_tries,
            on_done=self._progress,
            rating_parse=self.rating_parse,
        )
        expansion.start()
        return expansion

    def _start(self) -> None:
        raise NotImplementedError

    def _progress(self) -> None:
        raise NotImplementedError
