"""Stage 1: the single-step refinement tree (k criticisms x m improvements of y0) and the data it
yields: one RSFT example and up to three preference pairs (response, criticism, improvement).

Two rule sets (`gating`, recipe key synth.pairs.gating): "reference", the authors' code that
produced the paper's numbers (sequential per prompt, see `reference_pairs`), and "independent",
each pair type judged on its own (see `preference_pairs`).

Rejection reasons are `"<output>:<rule>"` strings (e.g. "criticism:same_text") so a run summary
can count acceptance per rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avr_megatron.method.chat import Message, message
from avr_megatron.method.expansion import Expansion, RefinerBase
from avr_megatron.method.filters import FilterConfig, length_reason, repetition_reason
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.records import preference_record, sft_record
from avr_megatron.method.requests import make_key
from avr_megatron.method.rewards import argmax, argmin, criticism_value
from avr_megatron.method.tree import Provenance, RefinementNode, RefinementTree, rewards_of

STAGE = "s1"
REFERENCE, INDEPENDENT = "reference", "independent"
GATINGS = (REFERENCE, INDEPENDENT)


class Stage1TreeBuilder(RefinerBase):
    """Builds one prompt's stage-1 tree by emitting requests and consuming results.

    Phases (each emitted as soon as it is ready): generate y0 when `y0` is None; score y0 when
    `r0` is None (alongside the rest); k criticisms of y0, each resampled while it lacks a
    parsable `[[n]]` rating, `max_rating_tries` samples in all, then dropped; m improvements per
    surviving criticism; a score for every non-blank improvement (blank ones are dropped and
    counted). Deterministic: the same results give the same tree, whatever order they arrive in.
    """

    def __init__(
        self,
        prompt_id: str,
        x: Sequence[Message],
        y0: str | None = None,
        *,
        k: int = 2,
        m: int = 2,
        provenance: Provenance,
        r0: float | None = None,
        templates: PromptTemplates = PromptTemplates(),
        max_rating_tries: int = 5,
        max_answer_tries: int = 5,
        rating_parse: str = "first",
    ) -> None:
        self._round: Expansion | None = None
        super().__init__(
            prompt_id, x, y0, r0, stage=STAGE, k=k, m=m, provenance=provenance, templates=templates,
            max_rating_tries=max_rating_tries, max_answer_tries=max_answer_tries,
            rating_parse=rating_parse,
        )

    def _start(self) -> None:
        assert self.root is not None
        self._round = self._expansion([self.root], 1)

    def _progress(self) -> None:
        pass  # nothing follows the single round

    @property
    def done(self) -> bool:
        if self.failure is not None:
            return True
        return self._round is not None and self._round.finished and self.root is not None and self.root.reward is not None

    @property
    def tree(self) -> RefinementTree:
        if not self.done:
            raise RuntimeError(f"{self.name}: the tree is not complete yet")
        if self._tree is None or self.failure is not None:
            raise RuntimeError(f"{self.name}: no tree ({self.failure})")
        return self._tree


def _complete_root(tree: RefinementTree) -> tuple[RefinementNode, float]:
    if not isinstance(tree, RefinementTree):
        raise ValueError(f"expected a RefinementTree, got {type(tree).__name__}")
    root = tree.root
    if root.reward is None:
        raise ValueError(f"tree {tree.prompt_id!r}: y0 has no reward (tree not complete)")
    rewards_of(root.children)  # every improvement must be scored
    return root, root.reward


def _check_gating(gating: str) -> str:
    if gating not in GATINGS:
        raise ValueError(f"gating: expected one of {', '.join(GATINGS)}, got {gating!r}")
    return gating


def best_improvement(tree: RefinementTree, gating: str = REFERENCE) -> RefinementNode | None:
    """The best improvement of y0, None if there is none.

    reference: found with `>=` starting from r(y0), so None when every improvement is below
    r(y0), and the last of tied improvements wins (the authors' scoring script).
    independent: the highest-reward improvement, the first in tree order on ties.
    """
    root, r0 = _complete_root(tree)
    if _check_gating(gating) == REFERENCE:
        best, best_reward = None, r0
        for child in root.children:
            assert child.reward is not None
            if child.reward >= best_reward:
                best, best_reward = child, child.reward
        return best
    i = argmax(rewards_of(root.children))
    return None if i is None else root.children[i]


def _criticism_values(root: RefinementNode, r0: float) -> tuple[list[list[RefinementNode]], list[float]]:
    """The children of y0 grouped by criticism (index order) and each criticism's value."""
    groups = [children for _, children in root.criticism_groups()]
    values = []
    for children in groups:
        value = criticism_value(rewards_of(children), r0)
        assert value is not None  # a group has at least one child
        values.append(value)
    return groups, values


def _text_of_criticism(node: RefinementNode) -> str:
    if node.criticism is None:
        raise ValueError(f"node {node.id!r}: an improvement without its criticism")
    return node.criticism


def _pair(tree: RefinementTree, pair_type: str, prompt: list[Message], chosen: str, rejected: str,
          reward_chosen: float, reward_rejected: float) -> dict[str, Any]:
    return preference_record(
        id=make_key(tree.prompt_id, STAGE, pair_type), pair_type=pair_type, stage=1,
        prompt_id=tree.prompt_id, prompt=prompt, chosen=chosen, rejected=rejected, round=1,
        reward_chosen=reward_chosen, reward_rejected=reward_rejected, reward_base=tree.root.reward,
        provenance=tree.provenance,
    )


def rsft_example(tree: RefinementTree, filters: FilterConfig = FilterConfig(), gating: str = REFERENCE
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """The RSFT conversation `[*x, y0, criticise, c, improve, y_best]` when the best improvement
    (see `best_improvement`) beats y0 and passes the length filter; otherwise (None, reason)."""
    _check_gating(gating)
    root, r0 = _complete_root(tree)
    if not root.children:
        return None, "rsft:no_improvement"
    best = best_improvement(tree, gating)
    if best is None or not best.reward > r0:
        return None, "rsft:no_gain"
    assert best.reward is not None
    if length_reason(best.answer, root.answer, filters):
        return None, "rsft:length"
    turns = tree.templates.improve_turns(tree.x, root.answer, _text_of_criticism(best))
    record = sft_record(
        id=make_key(tree.prompt_id, STAGE, "rsft"), kind="rsft", stage=1, prompt_id=tree.prompt_id,
        messages=[*turns, message("assistant", best.answer)], round=1, reward=best.reward, reward_base=r0,
        provenance=tree.provenance,
    )
    return record, None


def _repetitive(filters: FilterConfig, *texts: str) -> bool:
    return any(repetition_reason(t, filters) for t in texts)


def preference_pairs(tree: RefinementTree, filters: FilterConfig = FilterConfig(), gating: str = REFERENCE
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """The accepted pairs of a complete tree, and one rejection reason per pair type not accepted
    (`gating`: "reference", see `reference_pairs`, or "independent", below).

    independent: each pair type is judged on its own.

    response:    prompt x; chosen = best improvement, rejected = y0; needs r(best) > r(y0).
    criticism:   prompt [x, y0, criticise]; chosen / rejected = criticisms with the highest /
                 lowest value (first on ties, see rewards.criticism_value); needs two criticisms,
                 different texts, a strictly higher value, and the best child of the chosen
                 criticism >= r(y0).
    improvement: prompt [x, y0, criticise, c_best, improve], c_best = the chosen criticism above
                 (the only one when one survived); chosen / rejected = its highest / lowest child;
                 needs two children, strictly ordered rewards, and r(rejected) != r(y0).
    Every pair also needs chosen != rejected text (beyond the note: a reward model that is not
    bit-reproducible can score one text twice) and both texts free of degenerate repetition.
    """
    if _check_gating(gating) == REFERENCE:
        return reference_pairs(tree, filters)
    root, r0 = _complete_root(tree)
    x, y0, t = tree.x, root.answer, tree.templates
    pairs: list[dict[str, Any]] = []
    rejected: list[str] = []

    # Response pair.
    rewards = rewards_of(root.children)
    i = argmax(rewards)
    if i is None:
        rejected.append("response:no_improvement")
    elif not rewards[i] > r0:
        rejected.append("response:no_gain")
    elif root.children[i].answer == y0:
        rejected.append("response:same_text")
    elif _repetitive(filters, root.children[i].answer, y0):
        rejected.append("response:repetition")
    else:
        pairs.append(_pair(tree, "response", list(x), root.children[i].answer, y0, rewards[i], r0))

    # Criticism pair.
    groups, values = _criticism_values(root, r0)
    b = argmax(values)
    w = argmin(values, exclude=b)
    if b is None or w is None:
        rejected.append("criticism:too_few")
    else:
        c_best, c_worst = _text_of_criticism(groups[b][0]), _text_of_criticism(groups[w][0])
        if not values[b] > values[w]:
            rejected.append("criticism:no_strict_order")
        elif c_best == c_worst:
            rejected.append("criticism:same_text")
        elif max(rewards_of(groups[b])) < r0:
            rejected.append("criticism:best_child_below_base")
        elif _repetitive(filters, c_best, c_worst):
            rejected.append("criticism:repetition")
        else:
            prompt = [*x, message("assistant", y0), message("user", t.criticise)]
            pairs.append(_pair(tree, "criticism", prompt, c_best, c_worst, values[b], values[w]))

    # Improvement pair, under the best criticism.
    if b is None:
        rejected.append("improvement:no_criticism")
    else:
        children = groups[b]
        child_rewards = rewards_of(children)
        hi = argmax(child_rewards)
        lo = argmin(child_rewards, exclude=hi)
        if hi is None or lo is None:
            rejected.append("improvement:too_few")
        elif not child_rewards[hi] > child_rewards[lo]:
            rejected.append("improvement:no_strict_order")
        elif child_rewards[lo] == r0:
            rejected.append("improvement:rejected_equals_base")
        elif children[hi].answer == children[lo].answer:
            rejected.append("improvement:same_text")
        elif _repetitive(filters, children[hi].answer, children[lo].answer):
            rejected.append("improvement:repetition")
        else:
            prompt = t.improve_turns(x, y0, _text_of_criticism(children[hi]))
            pairs.append(_pair(tree, "improvement", prompt, children[hi].answer, children[lo].answer,
                               child_rewards[hi], child_rewards[lo]))
    return pairs, rejected


def _mean(rewards: Sequence[float]) -> float:
    return sum(rewards) / len(rewards)  # the reference's own arithmetic, so ties fall the same way


def _groups_by_text(root: RefinementNode) -> list[tuple[str, list[RefinementNode]]]:
    """y0's improvements grouped by the text of their criticism, in order of first appearance."""
    groups: dict[str, list[RefinementNode]] = {}
    for child in root.children:
        groups.setdefault(_text_of_criticism(child), []).append(child)
    return list(groups.items())


def _extremes(children: list[RefinementNode]) -> tuple[RefinementNode, RefinementNode] | None:
    """(highest, lowest) child when there are two or more and their rewards differ: the first of
    the highest and the last of the lowest on ties (a stable sort by reward, high to low)."""
    if len(children) < 2:
        return None
    order = sorted(children, key=lambda c: c.reward, reverse=True)  # type: ignore[arg-type, return-value]
    hi, lo = order[0], order[-1]
    assert hi.reward is not None and lo.reward is not None
    return (hi, lo) if hi.reward > lo.reward else None


def reference_pairs(tree: RefinementTree, filters: FilterConfig = FilterConfig()) -> tuple[list[dict[str, Any]], list[str]]:
    """The authors' stage-1 pair rules: one pass per prompt in which a failed step drops every
    pair after it (the rule that dropped them is named in each reason).

    1. Skip the prompt when y0 is degenerate (response:y0_repetition), has no improvement
       (response:no_improvement), none >= r(y0) (response:below_base; the best is found with
       `>=` from r(y0), the last tied one wins), the best is degenerate (response:repetition) or
       r(best) - r(y0) <= 0 (response:no_gain). Else the response pair (x; best vs y0).
    2. Criticisms are grouped by text (first appearance first); best / worst = the first highest
       / lowest mean child reward. (Every group of a complete tree has a scored improvement.)
    3. Under the best criticism, the improvement candidate is (highest, lowest) child when there
       are >= 2 and a strict order. A candidate below r(y0) ends the prompt
       (criticism:best_child_below_base, improvement:chosen_below_base).
    4. The criticism conditions: the best criticism degenerate (criticism:repetition), one
       criticism text only (criticism:too_few), no strictly higher mean (criticism:
       no_strict_order) or max child of the best criticism < r(y0) (criticism:
       best_child_below_base) end the prompt. Else the criticism pair ([x, y0, criticise]; best vs
       worst), unless the worst criticism is degenerate (criticism:worst_repetition): only that
       pair is dropped.
    5. The improvement pair ([x, y0, criticise, c_best, improve]; highest vs lowest child) needs
       the candidate (improvement:too_few / improvement:no_strict_order), r(lowest) != r(y0)
       (improvement:rejected_equals_base) and neither text degenerate (improvement:repetition).
    Pair types dropped by an earlier step get `<type>:after_response` / `after_criticism`.
    """
    root, r0 = _complete_root(tree)
    x, y0, t = tree.x, root.answer, tree.templates
    pairs: list[dict[str, Any]] = []

    def stop(*reasons: str) -> tuple[list[dict[str, Any]], list[str]]:
        return pairs, list(reasons)

    def degenerate(text: str) -> bool:
        return repetition_reason(text, filters) is not None

    # 1. The response pair.
    after = ("criticism:after_response", "improvement:after_response")
    if degenerate(y0):
        return stop("response:y0_repetition", *after)
    if not root.children:
        return stop("response:no_improvement", *after)
    best = best_improvement(tree, REFERENCE)
    if best is None:
        return stop("response:below_base", *after)
    assert best.reward is not None
    if degenerate(best.answer):
        return stop("response:repetition", *after)
    if not best.reward - r0 > 0:
        return stop("response:no_gain", *after)
    pairs.append(_pair(tree, "response", list(x), best.answer, y0, best.reward, r0))

    # 2. Best and worst criticism, by mean child reward.
    groups = _groups_by_text(root)
    means = [_mean(rewards_of(children)) for _, children in groups]
    b = w = 0
    for i, mean in enumerate(means):
        if mean > means[b]:
            b = i
        if mean < means[w]:
            w = i
    (c_best, best_children), (c_worst, worst_children) = groups[b], groups[w]

    # 3. The improvement candidate under the best criticism.
    candidate = _extremes(best_children)
    if candidate is not None and candidate[0].reward < r0:  # type: ignore[operator]
        return stop("criticism:best_child_below_base", "improvement:chosen_below_base")

    # 4. The criticism pair.
    after = ("improvement:after_criticism",)
    if degenerate(c_best):
        return stop("criticism:repetition", *after)
    if c_best == c_worst:
        return stop("criticism:too_few" if len(groups) == 1 else "criticism:no_strict_order", *after)
    if not means[b] > means[w]:
        return stop("criticism:no_strict_order", *after)
    if max(rewards_of(best_children)) < r0:
        return stop("criticism:best_child_below_base", *after)
    rejected: list[str] = []
    if degenerate(c_worst):
        rejected.append("criticism:worst_repetition")
    else:
        prompt = [*x, message("assistant", y0), message("user", t.criticise)]
        pairs.append(_pair(tree, "criticism", prompt, c_best, c_worst, _value(best_children, r0),
                           _value(worst_children, r0)))

    # 5. The improvement pair.
    if candidate is None:
        rejected.append("improvement:too_few" if len(best_children) < 2 else "improvement:no_strict_order")
        return pairs, rejected
    hi, lo = candidate
    assert hi.reward is not None and lo.reward is not None
    if lo.reward == r0:
        rejected.append("improvement:rejected_equals_base")
    elif degenerate(hi.answer) or degenerate(lo.answer):
        rejected.append("improvement:repetition")
    else:
        pairs.append(_pair(tree, "improvement", t.improve_turns(x, y0, c_best), hi.answer, lo.answer,
                           hi.reward, lo.reward))
    return pairs, rejected


def _value(children: list[RefinementNode], r0: float) -> float:
    value = criticism_value(rewards_of(children), r0)
    assert value is not None
    return value
