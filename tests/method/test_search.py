import json

import pytest
from hypothesis import given, settings, strategies as st
from method_fakes import PROVENANCE, X, FakeEngine, Scripted, search

from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.search import RefinementSearch, SearchResult
from avr_megatron.method.stage1 import Stage1TreeBuilder

def test_stops_when_a_round_is_not_strictly_better():
    table = {"r1/b0/c0/y0": 1.0, "r1/b0/c0/y1": 2.0, "r1/b0/c1/y0": 0.5, "r2/b0/c1/y1": 2.0}
    result = search(Scripted(table))
    assert result.stop_reason == "no_improvement" and result.best_id == "r1/b0/c0/y1"
    r1, r2 = result.rounds
    assert (r1.round, r1.parent_ids, r1.previous_best, r1.best_reward, r1.improved) == (1, ["y0"], 0.0, 2.0, True)
    assert r1.candidate_ids == ["r1/b0/c0/y0", "r1/b0/c0/y1", "r1/b0/c1/y0", "r1/b0/c1/y1"]
    assert r1.kept_ids == ["r1/b0/c0/y1"]
    # Round 2 expands the kept answer; its best ties the best so far: not strictly better.
    assert (r2.parent_ids, r2.previous_best, r2.best_reward, r2.improved, r2.kept_ids) == (["r1/b0/c0/y1"], 2.0, 2.0, False, [])
    kept = result.tree.find("r1/b0/c0/y1")
    assert [c.id for c in kept.children] == ["r2/b0/c0/y0", "r2/b0/c0/y1", "r2/b0/c1/y0", "r2/b0/c1/y1"]
    assert result.ended_on_failed_round


@pytest.mark.parametrize(
    "table, best",
    [
        # Ties within a round: the first in (criticism, improvement) order wins (a strict `>`).
        ({"r1/b0/c0/y1": 2.0, "r1/b0/c1/y0": 2.0, "r1/b0/c1/y1": 2.0}, "r1/b0/c0/y1"),
        ({"r1/b0/c1/y0": 2.0, "r1/b0/c1/y1": 2.0}, "r1/b0/c1/y0"),
        ({"r1/b0/c0/y0": 1.0, "r1/b0/c1/y1": 2.0}, "r1/b0/c1/y1"),
    ],
)
def test_round_best_is_the_first_strict_maximum(table, best):
    result = search(Scripted(table), max_rounds=1)
    assert result.best_id == best and result.rounds[0].kept_ids == [best]


def test_stops_after_max_rounds():
    table = {f"r{r}/b0/c0/y0": float(r) for r in range(1, 10)}
    result = search(Scripted(table), max_rounds=3)
    assert result.stop_reason == "max_rounds" and len(result.rounds) == 3
    assert all(r.improved for r in result.rounds) and not result.ended_on_failed_round
    assert result.best_id == "r3/b0/c0/y0" and result.best.reward == 3.0
    assert [n.id for n in result.tree.lineage(result.best_id)] == ["y0", "r1/b0/c0/y0", "r2/b0/c0/y0", "r3/b0/c0/y0"]


def test_default_max_rounds_is_five():
    result = search(Scripted({f"r{r}/b0/c0/y0": float(r) for r in range(1, 10)}))
    assert len(result.rounds) == 5 and result.stop_reason == "max_rounds"


def test_beam_keeps_top_b_and_expands_each():
    table = {"r1/b0/c0/y0": 1.0, "r1/b0/c1/y1": 3.0, "r1/b0/c1/y0": 2.0,
             "r2/b1/c0/y0": 2.5, "r2/b0/c1/y1": 4.0}
    result = search(Scripted(table), beam_width=2)
    r1, r2, r3 = result.rounds
    assert r1.kept_ids == ["r1/b0/c1/y1", "r1/b0/c1/y0"]  # best first
    assert r2.parent_ids == r1.kept_ids and len(r2.candidate_ids) == 8
    assert r2.best_reward == 4.0 and r2.improved and r2.kept_ids == ["r2/b0/c1/y1", "r2/b1/c0/y0"]
    assert not r3.improved and result.best_id == "r2/b0/c1/y1"
    assert [n.id for n in result.tree.lineage("r2/b1/c0/y0")] == ["y0", "r1/b0/c1/y0", "r2/b1/c0/y0"]


def test_a_round_without_scored_improvements_ends_the_search():
    result = search(FakeEngine(p_no_rating=1.0), max_rating_tries=2)
    assert result.stop_reason == "no_candidates" and result.best_id == "y0"
    (r1,) = result.rounds
    assert r1.candidate_ids == [] and r1.best_reward is None and not r1.improved
    assert result.tree.root.counters == {"criticism_resamples": 2, "criticisms_dropped": 2}


def test_round_evaluation_waits_for_y0_score():
    s = RefinementSearch("q", X, "first", None, k=1, m=1, provenance=PROVENANCE)
    s.feed({"q/s2/r1/b0/crit/t1": ["c [[2]]"]})
    s.feed({"q/s2/r1/b0/c0/improve": ["better"]})
    s.feed({"q/s2/r1/b0/c0/y0/score": 5.0})
    assert s.rounds == [] and [r.key for r in s.pending()] == ["q/s2/y0/score"]
    s.feed({"q/s2/y0/score": 1.0})
    assert len(s.rounds) == 1 and s.rounds[0].improved
    assert {r.key for r in s.pending()} == {"q/s2/r2/b0/crit/t1"}


def test_given_reward_and_generated_y0():
    s = RefinementSearch("q", X, "first", 0.5, provenance=PROVENANCE)
    assert [r.key for r in s.pending()] == ["q/s2/r1/b0/crit/t1"]
    s = RefinementSearch("q", X, provenance=PROVENANCE)
    assert [r.key for r in s.pending()] == ["q/s2/y0/t1"]
    with pytest.raises(RuntimeError, match="not finished"):
        s.result


@pytest.mark.parametrize("kw, match", [(dict(max_rounds=0), "^max_rounds"), (dict(beam_width=0), "^beam_width")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        RefinementSearch("q", X, "y", provenance=PROVENANCE, **kw)


def test_result_json_round_trip_and_errors():
    result = search(FakeEngine(seed=9, p_no_rating=0.3), beam_width=2)
    d = json.loads(json.dumps(result.to_dict()))
    assert SearchResult.from_dict(d) == result
    d["rounds"][0]["improved"] = "yes"
    with pytest.raises(ValueError, match=r"^search\.rounds\[0\]\.improved: expected a bool"):
        SearchResult.from_dict(d)
    d = result.to_dict()
    d["stop_reason"] = "bored"
    with pytest.raises(ValueError, match="stop_reason: expected one of"):
        SearchResult.from_dict(d)
    d = result.to_dict()
    d["best_id"] = "r9/b0/c0/y0"
    with pytest.raises(ValueError, match="no node 'r9/b0/c0/y0'"):
        SearchResult.from_dict(d)


def test_mixed_machines_in_one_frontier():
    engine = FakeEngine(seed=4)
    machines = [Stage1TreeBuilder("a", X, "y", provenance=PROVENANCE), RefinementSearch("b", X, "y", provenance=PROVENANCE)]
    run_frontier(machines, engine.generate, engine.score)
    assert all(m.done for m in machines)
    assert run_frontier(machines, engine.generate, engine.score) == 0


def drive_one_by_one(s, engine):
    while not s.done:
        for r in sorted(s.pending(), key=lambda r: r.key, reverse=True):
            value = engine.generate([r])[0] if hasattr(r, "n") else engine.score([r])[0]
            s.feed({r.key: value})
    return s.result


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([0.0, 0.5]), st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 4))
def test_search_invariants_and_determinism(seed, p_no_rating, beam, k, m, max_rounds):
    engine = FakeEngine(seed, p_no_rating, 0.1)
    kw = dict(k=k, m=m, beam_width=beam, max_rounds=max_rounds)
    result = search(engine, **kw)
    again = drive_one_by_one(RefinementSearch("q", X, "first", None, provenance=PROVENANCE, **kw), engine)
    assert result.to_dict() == again.to_dict()
    assert 1 <= len(result.rounds) <= max_rounds
    previous = result.tree.root.reward
    for i, r in enumerate(result.rounds):
        assert r.round == i + 1 and r.previous_best == previous
        assert r.improved == (r.best_reward is not None and r.best_reward > previous)
        kept = [result.tree.find(n) for n in r.kept_ids]
        assert len(kept) <= beam and set(r.kept_ids) <= set(r.candidate_ids)
        assert [n.reward for n in kept] == sorted((n.reward for n in kept), reverse=True)
        if r.improved:
            assert kept[0].reward == r.best_reward
            previous = r.best_reward
        if i + 1 < len(result.rounds):
            assert r.improved and result.rounds[i + 1].parent_ids == r.kept_ids
    assert result.best.reward == previous
    last = result.rounds[-1]
    expected = "max_rounds" if last.improved else ("no_candidates" if last.best_reward is None else "no_improvement")
    assert result.stop_reason == expected
