import pytest
from hypothesis import given, settings, strategies as st
from method_fakes import PROVENANCE, X, Scripted, search

from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.search import RefinementSearch

from avr_megatron.method.filters import FilterConfig
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.stage2 import ThoughtSample, thought_from_search, thought_pairs, thought_sft_example
from avr_megatron.method.thoughts import RefinementThought, extract_final_answer, parse_thought, render_thought

T = PromptTemplates()


class NoRatingInRound(Scripted):
    """Criticisms of round `n` never carry a rating."""

    def __init__(self, table, n, **kw):
        super().__init__(table, **kw)
        self.n = n

    def sample(self, request, j):
        if request.messages[-1]["content"] == self.templates.criticise and f"/r{self.n}/" in request.key:
            return "no verdict"
        return super().sample(request, j)


def test_thought_from_a_search_that_ends_on_a_failed_round():
    # Round 1 improves (best r1/b0/c1/y0), round 2 improves (r2/b0/c0/y1), round 3 fails; in the
    # failed round the closest attempt is under criticism c1.
    table = {"r1/b0/c1/y0": 1.0, "r2/b0/c0/y1": 2.0, "r3/b0/c1/y1": 1.5, "r3/b0/c0/y0": 0.5}
    result = search(Scripted(table))
    assert result.stop_reason == "no_improvement" and result.best_id == "r2/b0/c0/y1"
    thought, reason = thought_from_search(result)
    tree = result.tree
    assert reason is None
    assert thought.first_answer == "first"
    assert thought.steps == (
        (tree.find("r1/b0/c1/y0").criticism, tree.find("r1/b0/c1/y0").answer),
        (tree.find("r2/b0/c0/y1").criticism, tree.find("r2/b0/c0/y1").answer),
    )
    assert thought.failed_criticism == tree.find("r3/b0/c1/y1").criticism
    assert thought.final_answer == result.best.answer

    record, reason = thought_sft_example(result)
    assert reason is None and record["kind"] == "thought" and record["stage"] == 2 and record["id"] == "q/s2/thought"
    assert record["messages"][:-1] == X and record["messages"][-1]["role"] == "assistant"
    assert parse_thought(record["messages"][-1]["content"]).thought() == thought
    assert (record["reward"], record["reward_base"], record["reward_gain"], record["round"]) == (2.0, 0.0, 2.0, 2)
    assert record["model"] == "policy-test" and record["reward_model"] == "rm-test"


@pytest.mark.parametrize(
    "engine, kw, reason",
    [
        (Scripted({}), {}, "thought_sft:round1_no_improvement"),
        (Scripted({"r1/b0/c0/y0": 1.0, "r2/b0/c0/y0": 2.0}), {"max_rounds": 2}, "thought_sft:no_failed_round"),
        (NoRatingInRound({"r1/b0/c0/y0": 1.0}, 2), {"max_rating_tries": 1}, "thought_sft:no_failed_criticism"),
        (NoRatingInRound({}, 1), {"max_rating_tries": 1}, "thought_sft:round1_no_improvement"),
    ],
)
def test_thought_rejections(engine, kw, reason):
    assert thought_sft_example(search(engine, **kw)) == (None, reason)


def test_thought_sft_skips_a_degenerate_first_answer_when_asked():
    s = RefinementSearch("q", X, "again " * 60, None, k=2, m=2, provenance=PROVENANCE)
    engine = Scripted({"r1/b0/c0/y0": 1.0})
    run_frontier([s], engine.generate, engine.score)
    result = s.result
    assert thought_sft_example(result, y0_filter=FilterConfig()) == (None, "thought_sft:y0_repetition")
    assert thought_sft_example(result, y0_filter=FilterConfig(repetition_threshold=61))[1] is None
    assert thought_sft_example(result)[1] is None  # no y0_filter: kept
    # The y0 check comes first, as in the reference.
    failing = search(Scripted({}))
    assert thought_sft_example(failing, y0_filter=FilterConfig())[1] == "thought_sft:round1_no_improvement"


def test_single_improving_round_is_kept():
    result = search(Scripted({"r1/b0/c0/y0": 1.0}))
    thought, reason = thought_from_search(result)
    assert reason is None and len(thought.steps) == 1 and len(result.rounds) == 2


def test_thought_uses_the_search_templates_and_optional_filter():
    templates = PromptTemplates(thought_open="<<think>>", thought_close="<</think>>")
    engine = Scripted({"r1/b0/c0/y0": 1.0}, templates=templates)
    result = search(engine, templates=templates)
    record, _ = thought_sft_example(result)
    text = record["messages"][-1]["content"]
    assert text.startswith("<<think>>\n") and parse_thought(text, templates).well_formed
    assert thought_sft_example(result, templates=T)[0]["messages"][-1]["content"].startswith("<refinement>\n")
    assert thought_sft_example(result, filters=FilterConfig(repetition_threshold=2)) == (None, "thought_sft:repetition")


def thought(final, first="draft"):
    return render_thought(RefinementThought(first, (("c [[3]]", final),), "c2 [[8]]"))


def pairs(samples, source=0.0, **kw):
    return thought_pairs(samples, source, prompt_id="q", x=X, provenance=PROVENANCE, **kw)


def test_best_against_worst():
    samples = [ThoughtSample(thought("mid"), 1.0), ThoughtSample(thought("top"), 3.0), ThoughtSample(thought("low!!"), -1.0)]
    out = pairs(samples)
    assert out.reason is None and (out.n_samples, out.n_without_answer, out.n_malformed) == (3, 0, 0)
    p = out.pair
    assert p["pair_type"] == "thought" and p["prompt"] == X and p["id"] == "q/s2/thought" and p["stage"] == 2
    assert p["chosen"][0]["content"] == samples[1].text and p["rejected"][0]["content"] == samples[2].text
    assert (p["reward_chosen"], p["reward_rejected"], p["reward_gap"], p["reward_base"]) == (3.0, -1.0, 4.0, 0.0)


def test_thought_pair_rules():
    a, b = ThoughtSample(thought("good"), 2.0), ThoughtSample(thought("bad!"), 1.0)
    assert pairs([a, b], source=2.0).reason == "thought:not_better_than_source"
    assert pairs([a, ThoughtSample(thought("also"), 2.0)]).reason == "thought:no_strict_order"
    assert pairs([a]).reason == "thought:too_few_answers"
    assert pairs([a, ThoughtSample(a.text, 1.0)]).reason == "thought:same_text"
    # Length control: the best final answer may not be longer than the worst's.
    longer = ThoughtSample(thought("a much longer answer"), 3.0)
    assert pairs([longer, b]).reason == "thought:length"
    assert pairs([longer, b], length_control=False).reason is None
    assert pairs([ThoughtSample(thought("four"), 3.0), b]).reason is None  # equal length is fine
    loop = ThoughtSample(thought("again " * 60), 0.5)
    assert pairs([a, loop], length_control=False).reason is None
    assert pairs([a, loop], length_control=False, filters=FilterConfig()).reason == "thought:repetition"


def test_malformed_thoughts_are_counted_not_paired():
    truncated = ThoughtSample(thought("x")[:20], None)
    sloppy = ThoughtSample("I think so.\nFinal answer: yes", 5.0)  # an answer, but no thought layout
    good = ThoughtSample(thought("fine"), 1.0)
    out = pairs([truncated, sloppy, good, ThoughtSample("", None)])
    assert (out.n_samples, out.n_without_answer, out.n_malformed) == (4, 2, 1)
    assert out.reason is None and out.pair["chosen"][0]["content"] == sloppy.text
    assert "missing opening marker" in out.problems
    assert pairs([truncated, truncated]).reason == "thought:too_few_answers"


def test_reward_must_match_the_presence_of_a_final_answer():
    with pytest.raises(ValueError, match=r"samples\[0\]\.reward: the thought has no final answer"):
        pairs([ThoughtSample("no answer", 1.0)])
    with pytest.raises(ValueError, match=r"samples\[0\]\.reward: missing"):
        pairs([ThoughtSample(thought("x"), None)])
    with pytest.raises(ValueError, match=r"samples\[1\]: expected a ThoughtSample"):
        pairs([ThoughtSample(thought("x"), 1.0), "text"])
    with pytest.raises(ValueError, match="source_reward: expected a finite number"):
        pairs([], source=float("nan"))


finals = st.sampled_from(["a", "bb", "ccc", "a longer final answer", "again " * 60])
sample = st.one_of(
    st.tuples(finals, st.sampled_from([-1.0, 0.0, 1.0, 2.0])).map(lambda t: ThoughtSample(thought(t[0]), t[1])),
    st.sampled_from(["", "cut <refinement>", "<refinement>\nDraft answer:\nx"]).map(lambda s: ThoughtSample(s, None)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(sample, max_size=5), st.sampled_from([-1.0, 0.0, 1.0]), st.booleans())
def test_thought_pair_invariants(samples, source, length_control):
    out = pairs(samples, source=source, length_control=length_control)
    assert out.n_samples == len(samples)
    assert out.n_without_answer == sum(extract_final_answer(s.text) is None for s in samples)
    assert (out.pair is None) != (out.reason is None)
    if out.pair is not None:
        p = out.pair
        assert p["reward_chosen"] > source and p["reward_chosen"] > p["reward_rejected"]
        assert p["reward_chosen"] == max(s.reward for s in samples if s.reward is not None)
        assert p["reward_rejected"] == min(s.reward for s in samples if s.reward is not None)
        chosen, rejected = (extract_final_answer(p[c][0]["content"]) for c in ("chosen", "rejected"))
        if length_control:
            assert len(chosen) <= len(rejected)
