import json

import pytest
from method_fakes import PROVENANCE, X, FakeEngine, Scripted, search

from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.stage1 import Stage1TreeBuilder, preference_pairs, rsft_example
from avr_megatron.method.stage2 import ThoughtPairOutcome
from avr_megatron.method.summary import RunSummary
from avr_megatron.method.tree import RefinementNode, RefinementTree


def tree(r0, rewards, counters=None):
    root = RefinementNode("y0", "y", reward=r0, counters=counters or {})
    root.children = [RefinementNode(f"r1/b0/c0/y{j}", f"a{j}", round=1, reward=r, criticism="c [[3]]", rating=3,
                                    criticism_index=0) for j, r in enumerate(rewards)]
    return RefinementTree("p", X, root, PROVENANCE)


def test_trees_outcomes_and_pairs():
    s = RunSummary()
    s.add_prompts(3)
    s.add_tree(tree(0.0, [1.0, 3.0], {"criticism_resamples": 2, "criticisms_dropped": 1}))
    s.add_tree(tree(2.0, [1.0]))
    s.add_tree(tree(0.0, []))  # nothing survived: no gain recorded for round 1
    s.add_failure("y0_blank")
    s.add_outcome("rsft", None)
    s.add_outcome("rsft", "rsft:length")
    s.add_pairs([{"pair_type": "response"}, {"pair_type": "criticism"}], ["improvement:too_few", "improvement:too_few"])
    s.add_thought_pairs(ThoughtPairOutcome(None, "thought:length", n_samples=5, n_without_answer=1, n_malformed=2))
    assert (s.prompts, s.trees, s.failures) == (3, 3, {"y0_blank": 1})
    assert s.events == {"criticism_resamples": 2, "criticisms_dropped": 1, "thoughts_sampled": 5,
                        "thoughts_without_answer": 1, "thoughts_malformed": 2}
    assert s.mean_gain_by_round() == {1: pytest.approx((3.0 - 1.0) / 2)}
    assert s.pairs_by_type == {"response": 1, "criticism": 1, "improvement": 0, "thought": 0}
    table = s.acceptance()
    assert table["rsft"] == {"accepted": 1, "rejected": {"length": 1}, "rate": 0.5}
    assert table["improvement"] == {"accepted": 0, "rejected": {"too_few": 2}, "rate": 0.0}
    assert table["thought"]["rejected"] == {"length": 1}
    report = json.loads(json.dumps(s.report()))
    assert report["mean_gain_by_round"] == {"1": 1.0} and report["pairs_by_type"]["response"] == 1


def test_search_gains_per_round_and_stop_reasons():
    s = RunSummary()
    s.add_search(search(Scripted({"r1/b0/c0/y0": 1.0, "r2/b0/c0/y0": 1.5})))  # rounds: +1, +0.5, then fails
    s.add_search(search(Scripted({"r1/b0/c0/y0": 2.0})))
    assert s.gain_count == {1: 2, 2: 2, 3: 1}
    assert s.mean_gain_by_round()[1] == pytest.approx(1.5)
    assert s.mean_gain_by_round()[2] == pytest.approx((0.5 + (-10.0 - 2.0)) / 2)
    assert s.events["search_stop:no_improvement"] == 2


def test_merge_and_json_round_trip():
    engine = FakeEngine(seed=2, p_no_rating=0.3, p_blank=0.2)
    shards = []
    for shard in range(2):
        builders = [Stage1TreeBuilder(f"s{shard}p{i}", X, "y", provenance=PROVENANCE) for i in range(6)]
        run_frontier(builders, engine.generate, engine.score)
        s = RunSummary()
        s.add_prompts(len(builders))
        for b in builders:
            s.add_tree(b.tree)
            s.add_outcome("rsft", rsft_example(b.tree)[1])
            s.add_pairs(*preference_pairs(b.tree))
        shards.append(s)
    a, b = shards
    merged = a.merge(b)
    assert merged.prompts == 12 and merged.trees == 12
    for name in ("accepted", "rejected", "events", "gain_count"):
        mine, theirs, both = getattr(a, name), getattr(b, name), getattr(merged, name)
        assert both == {k: mine.get(k, 0) + theirs.get(k, 0) for k in set(mine) | set(theirs)}
    assert a.to_dict() == RunSummary.from_dict(json.loads(json.dumps(a.to_dict()))).to_dict()
    assert a.merge(RunSummary()).to_dict() == a.to_dict()
    other_way = b.merge(a)
    assert {k: v for k, v in other_way.to_dict().items() if k != "gain_sum"} == {
        k: v for k, v in merged.to_dict().items() if k != "gain_sum"}
    assert other_way.gain_sum == pytest.approx(merged.gain_sum)  # float sums may differ in the last bit


@pytest.mark.parametrize(
    "change, match",
    [
        ({"prompts": -1}, r"^summary\.prompts: expected an integer >= 0"),
        ({"accepted": {"rsft": 1.5}}, r"^summary\.accepted\.rsft: expected an integer"),
        ({"gain_sum": {"one": 1.0}}, r"^summary\.gain_sum: round key 'one'"),
        ({"gain_count": {"1": -1}}, r"^summary\.gain_count\.1: expected an integer >= 0"),
        ({"extra": 1}, r"^summary\.extra: unknown field"),
    ],
)
def test_from_dict_errors(change, match):
    d = RunSummary().to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        RunSummary.from_dict(d)
