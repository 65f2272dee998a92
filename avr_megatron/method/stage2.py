"""Stage 2 data: long refinement thoughts for SFT (from searches), then preference pairs between
thoughts sampled from the thought-SFT model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from avr_megatron.method.chat import Message, message, validate_conversation
from avr_megatron.method.filters import FilterConfig, repetition_reason
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.records import preference_record, sft_record
from avr_megatron.method.requests import make_key
from avr_megatron.method.rewards import argmax, argmin, check_reward
from avr_megatron.method.search import SearchResult
from avr_megatron.method.thoughts import RefinementThought, extract_final_answer, parse_thought, render_thought
from avr_megatron.method.tree import Provenance, RefinementNode, rewards_of

STAGE = "s2"


def thought_from_search(result: SearchResult) -> tuple[RefinementThought | None, str | None]:
    """The thought of a search, kept only if round 1 improved and the search ended on a failed
    round; otherwise (None, reason).

    Content: the lineage of the best answer (y0, then per improving round the criticism that led
    to the kept answer and that answer), then, as the failed round's criticism, the criticism (of
    the best answer, in the failed round) whose improvement scored highest, the first on ties
    (the attempt that came closest still did not beat the best answer).
    """
    if not isinstance(result, SearchResult):
        raise ValueError(f"expected a SearchResult, got {type(result).__name__}")
    if not result.rounds or not result.rounds[0].improved:
        return None, "thought_sft:round1_no_improvement"
    if not result.ended_on_failed_round:
        return None, "thought_sft:no_failed_round"
    best = result.best
    failed_round = result.rounds[-1].round
    attempts = [c for c in best.children if c.round == failed_round]
    if not attempts:
        return None, "thought_sft:no_failed_criticism"
    rewards = rewards_of(attempts)
    failed = attempts[rewards.index(max(rewards))]
    lineage = result.tree.lineage(best.id)
    steps = tuple((_criticism_of(node), node.answer) for node in lineage[1:])
    return RefinementThought(lineage[0].answer, steps, _criticism_of(failed)), None


def _criticism_of(node: RefinementNode) -> str:
    if node.criticism is None:
        raise ValueError(f"node {node.id!r}: an improvement without its criticism")
    return node.criticism


def thought_sft_example(
    result: SearchResult,
    templates: PromptTemplates | None = None,
    filters: FilterConfig | None = None,
    y0_filter: FilterConfig | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """The SFT record `[*x, assistant <thought>]` of a search, or (None, reason).

    `templates` default to the ones the search sampled with. `y0_filter`, when given (the
    reference), skips a search whose first answer is degenerate, before any other rule.
    `filters`, when given (beyond the reference), also drop thoughts with a degenerate answer or
    criticism.
    """
    if not isinstance(result, SearchResult):
        raise ValueError(f"expected a SearchResult, got {type(result).__name__}")
    if y0_filter is not None and repetition_reason(result.tree.root.answer, y0_filter):
        return None, "thought_sft:y0_repetition"
    thought, reason = thought_from_search(result)
    if thought is None:
        return None, reason
    if filters is not None and any(repetition_reason(s, filters) for s in (*thought.answers, *thought.criticisms)):
        return None, "thought_sft:repetition"
    tree = result.tree
    text = render_thought(thought, templates or tree.templates)
    best = result.best
    record = sft_record(
        id=make_key(tree.prompt_id, STAGE, "thought"), kind="thought", stage=2, prompt_id=tree.prompt_id,
        messages=[*tree.x, message("assistant", text)], round=best.round, reward=best.reward,
        reward_base=tree.root.reward, provenance=tree.provenance,
    )
    return record, None


@dataclass(frozen=True)
class ThoughtSample:
    """One thought sampled from the thought-SFT model, with r(x, final answer); the reward must be
    None exactly when the thought has no final answer (nothing to score)."""

    text: str
    reward: float | None


@dataclass
class ThoughtPairOutcome:
    pair: dict[str, Any] | None
    reason: str | None
    n_samples: int
    # Samples without a final answer (truncated or malformed): counted, never paired.
    n_without_answer: int
    # Samples with a final answer whose thought is not well formed (they still take part).
    n_malformed: int
    problems: list[str] = field(default_factory=list)


def _degenerate(text: str, templates: PromptTemplates, filters: FilterConfig) -> bool:
    """Repetition filter per section (a whole thought repeats common words by its length alone);
    a thought that does not parse into sections is checked as one text."""
    parsed = parse_thought(text, templates)
    pieces = [*parsed.answers, *parsed.criticisms, parsed.final_answer or ""] if parsed.well_formed else [text]
    return any(repetition_reason(p, filters) for p in pieces)


def thought_pairs(
    samples: Sequence[ThoughtSample],
    source_reward: float,
    *,
    prompt_id: str,
    x: Sequence[Message],
    provenance: Provenance,
    length_control: bool = True,
    templates: PromptTemplates = PromptTemplates(),
    filters: FilterConfig | None = None,
) -> ThoughtPairOutcome:
    """Pair the best against the worst sampled thought of one prompt (rewards of their final
    answers; the first sample on ties). Kept when best > source_reward and best > worst; with
    `length_control`, dropped when the best final answer is longer (in characters) than the
    worst's. `filters`, when given (the note does not filter thoughts), also drop pairs where a
    section of either thought is degenerate."""
    x = validate_conversation(x, f"prompt {prompt_id!r}: x", last_role="user")
    source = check_reward(source_reward, f"prompt {prompt_id!r}: source_reward")
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"prompt {prompt_id!r}: samples: expected a list of ThoughtSample")
    answered: list[tuple[ThoughtSample, str, float]] = []
    n_without, n_malformed, problems = 0, 0, []
    for i, s in enumerate(samples):
        where = f"prompt {prompt_id!r}: samples[{i}]"
        if not isinstance(s, ThoughtSample) or not isinstance(s.text, str):
            raise ValueError(f"{where}: expected a ThoughtSample with a text")
        final = extract_final_answer(s.text, templates)
        if final is None:
            if s.reward is not None:
                raise ValueError(f"{where}.reward: the thought has no final answer, so it cannot have a reward")
            n_without += 1
            continue
        if s.reward is None:
            raise ValueError(f"{where}.reward: missing (the thought has a final answer to score)")
        parsed = parse_thought(s.text, templates)
        if not parsed.well_formed:
            n_malformed += 1
            problems.extend(parsed.problems)
        answered.append((s, final, check_reward(s.reward, f"{where}.reward")))

    def outcome(pair: dict[str, Any] | None, reason: str | None) -> ThoughtPairOutcome:
        return ThoughtPairOutcome(pair, reason, len(samples), n_without, n_malformed, problems)

    rewards = [r for _, _, r in answered]
    hi = argmax(rewards)
    lo = argmin(rewards, exclude=hi)
    if hi is None or lo is None:
        return outcome(None, "thought:too_few_answers")
    (best, best_final, r_best), (worst, worst_final, r_worst) = answered[hi], answered[lo]
    if not r_best > source:
        return outcome(None, "thought:not_better_than_source")
    if not r_best > r_worst:
        return outcome(None, "thought:no_strict_order")
    if length_control and len(best_final) > len(worst_final):
        return outcome(None, "thought:length")
    if best.text == worst.text:
        return outcome(None, "thought:same_text")
    if filters is not None and (_degenerate(best.text, templates, filters) or _degenerate(worst.text, templates, filters)):
        return outcome(None, "thought:repetition")
    pair = preference_record(
        id=make_key(prompt_id, STAGE, "thought"), pair_type="thought", stage=2, prompt_id=prompt_id,
        prompt=x, chosen=best.text, rejected=worst.text, round=None, reward_chosen=r_best,
        reward_rejected=r_worst, reward_base=source, provenance=provenance,
    )
    return outcome(pair, None)
