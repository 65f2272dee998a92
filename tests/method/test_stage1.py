import json

import pytest
from hypothesis import given, settings, strategies as st
from method_fakes import PROVENANCE, X, FakeEngine

from avr_megatron.method.filters import FilterConfig, repetition_reason
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest
from avr_megatron.method.stage1 import Stage1TreeBuilder, best_improvement, preference_pairs, rsft_example
from avr_megatron.method.tree import Provenance, RefinementNode, RefinementTree

T = PromptTemplates()


def by_key(machine):
    return {r.key: r for r in machine.pending()}


# ---------------------------------------------------------------- the builder


def test_phases_keys_and_layouts():
    b = Stage1TreeBuilder("p1", X, "y0 text", k=2, m=2, provenance=PROVENANCE)
    reqs = by_key(b)
    assert set(reqs) == {"p1/s1/y0/score", "p1/s1/r1/b0/crit/t1"}
    assert reqs["p1/s1/y0/score"] == ScoreRequest("p1/s1/y0/score", [*X, {"role": "assistant", "content": "y0 text"}])
    crit = reqs["p1/s1/r1/b0/crit/t1"]
    assert crit.n == 2 and crit.messages == T.criticise_turns(X, "y0 text")
    assert (crit.sampling.temperature, crit.sampling.top_p) == (0.7, 0.8)
    b.feed({"p1/s1/r1/b0/crit/t1": ["c0 [[4]]", "c1 [[8]]"]})
    reqs = by_key(b)
    assert set(reqs) == {"p1/s1/y0/score", "p1/s1/r1/b0/c0/improve", "p1/s1/r1/b0/c1/improve"}
    imp = reqs["p1/s1/r1/b0/c1/improve"]
    assert imp.n == 2 and imp.messages == T.improve_turns(X, "y0 text", "c1 [[8]]")
    b.feed({"p1/s1/r1/b0/c0/improve": ["a00", "a01"], "p1/s1/r1/b0/c1/improve": ["a10", "a11"]})
    scores = by_key(b)
    assert set(scores) == {"p1/s1/y0/score"} | {f"p1/s1/r1/b0/c{i}/y{j}/score" for i in (0, 1) for j in (0, 1)}
    assert scores["p1/s1/r1/b0/c1/y0/score"].messages == [*X, {"role": "assistant", "content": "a10"}]
    assert not b.done
    with pytest.raises(RuntimeError, match="not complete"):
        b.tree
    b.feed({k: float(i) for i, k in enumerate(sorted(scores))})
    assert b.done and b.pending() == []
    tree = b.tree
    assert tree.root.reward == 4.0  # "p1/s1/y0/score" sorts last of the five
    kids = tree.root.children
    assert [c.id for c in kids] == ["r1/b0/c0/y0", "r1/b0/c0/y1", "r1/b0/c1/y0", "r1/b0/c1/y1"]
    assert [c.answer for c in kids] == ["a00", "a01", "a10", "a11"]
    assert [c.reward for c in kids] == [0.0, 1.0, 2.0, 3.0]
    assert [(c.criticism, c.rating, c.criticism_index, c.criticism_tries) for c in kids[1:3]] == [
        ("c0 [[4]]", 4, 0, 1), ("c1 [[8]]", 8, 1, 1)]
    assert kids[2].criticism_key == "p1/s1/r1/b0/crit/t1#1" and kids[3].sample_key == "p1/s1/r1/b0/c1/improve#1"
    assert tree.provenance == PROVENANCE and (tree.k, tree.m) == (2, 2)


def test_rating_resampling_five_tries_then_drop():
    b = Stage1TreeBuilder("p", X, "y0", r0=0.0, k=3, m=1, provenance=PROVENANCE)
    assert [r.key for r in b.pending()] == ["p/s1/r1/b0/crit/t1"]  # r0 known: no y0 score
    b.feed({"p/s1/r1/b0/crit/t1": ["ok [[5]]", "no rating", "[[0]] is not a rating"]})
    for t in (2, 3, 4):
        retry = by_key(b)[f"p/s1/r1/b0/crit/t{t}"]
        assert retry.n == (2 if t < 4 else 1)
        # slot 2 gets its rating on try 3; slot 1 never does
        b.feed({retry.key: ["still none", "fine [[9]]"] if t == 3 else ["none"] * retry.n})
    b.feed({"p/s1/r1/b0/crit/t5": ["none"]})
    assert not any(r.key.endswith("/t6") for r in b.pending())
    improve_keys = sorted(r.key for r in b.pending())
    assert improve_keys == ["p/s1/r1/b0/c0/improve", "p/s1/r1/b0/c2/improve"]
    b.feed({k: ["better"] for k in improve_keys})
    b.feed({r.key: 1.0 for r in b.pending()})
    tree = b.tree
    assert [(c.criticism_index, c.criticism_tries, c.rating) for c in tree.root.children] == [(0, 1, 5), (2, 3, 9)]
    assert tree.root.children[1].criticism_key == "p/s1/r1/b0/crit/t3#1"
    # Resampled: slot 1 four times (t2..t5), slot 2 twice (t2, t3); dropped: slot 1.
    assert tree.root.counters == {"criticism_resamples": 6, "criticisms_dropped": 1}


def test_max_rating_tries_is_configurable():
    b = Stage1TreeBuilder("p", X, "y0", r0=0.0, k=1, m=1, provenance=PROVENANCE, max_rating_tries=1)
    b.feed({"p/s1/r1/b0/crit/t1": ["no rating"]})
    assert b.done and b.tree.root.children == [] and b.tree.root.counters == {"criticisms_dropped": 1}


def test_generated_y0_and_blank_answers():
    b = Stage1TreeBuilder("p", X, None, k=1, m=3, provenance=PROVENANCE)
    (req,) = b.pending()
    assert isinstance(req, GenerateRequest) and req.key == "p/s1/y0/t1" and req.n == 1 and req.messages == X
    b.feed({"p/s1/y0/t1": ["   "]})  # blank y0 is resampled
    b.feed({"p/s1/y0/t2": ["real answer"]})
    assert {r.key for r in b.pending()} == {"p/s1/y0/score", "p/s1/r1/b0/crit/t1"}
    b.feed({"p/s1/r1/b0/crit/t1": ["c [[3]]"]})
    b.feed({"p/s1/r1/b0/c0/improve": ["x", "", " \n "]})  # blank improvements are dropped
    assert sorted(r.key for r in b.pending()) == ["p/s1/r1/b0/c0/y0/score", "p/s1/y0/score"]
    b.feed({"p/s1/r1/b0/c0/y0/score": 2.0, "p/s1/y0/score": 1.0})
    tree = b.tree
    assert tree.root.answer == "real answer" and tree.root.sample_key == "p/s1/y0/t2#0"
    assert [c.answer for c in tree.root.children] == ["x"]
    assert tree.root.counters == {"improvements_blank": 2}


def test_y0_that_stays_blank_fails_the_prompt():
    b = Stage1TreeBuilder("p", X, None, provenance=PROVENANCE, max_answer_tries=2)
    b.feed({"p/s1/y0/t1": [""]})
    b.feed({"p/s1/y0/t2": [" "]})
    assert b.done and b.failure == "y0_blank" and b.pending() == []
    with pytest.raises(RuntimeError, match="no tree"):
        b.tree


def test_done_waits_for_y0_score():
    b = Stage1TreeBuilder("p", X, "y0", k=1, m=1, provenance=PROVENANCE)
    b.feed({"p/s1/r1/b0/crit/t1": ["c [[3]]"]})
    b.feed({"p/s1/r1/b0/c0/improve": ["y1"]})
    b.feed({"p/s1/r1/b0/c0/y0/score": 1.0})
    assert not b.done and [r.key for r in b.pending()] == ["p/s1/y0/score"]
    b.feed({"p/s1/y0/score": 0.0})
    assert b.done


def test_feed_is_strict_and_atomic():
    b = Stage1TreeBuilder("p", X, "y0", k=2, m=1, provenance=PROVENANCE)
    before = [r.key for r in b.pending()]
    with pytest.raises(ValueError, match=r"prompt 'p': result for 'nope': no such pending request"):
        b.feed({"p/s1/y0/score": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match=r"result for 'p/s1/r1/b0/crit/t1': expected 2 texts, got 1"):
        b.feed({"p/s1/y0/score": 1.0, "p/s1/r1/b0/crit/t1": ["only one [[2]]"]})
    assert [r.key for r in b.pending()] == before  # nothing applied
    b.feed({"p/s1/y0/score": 1.0})
    with pytest.raises(ValueError, match="already answered"):
        b.feed({"p/s1/y0/score": 1.0})
    with pytest.raises(ValueError, match="expected a mapping"):
        b.feed([("p/s1/y0/score", 1.0)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "^k: expected an integer >= 1"),
        (dict(m=1.5), "^m: expected an integer"),
        (dict(max_rating_tries=0), "^max_rating_tries"),
        (dict(r0=float("nan")), r"^prompt 'p': r0: expected a finite number"),
        (dict(y0=" "), r"^prompt 'p': y0: is empty"),
        (dict(y0=None, r0=1.0), r"^prompt 'p': r0 given without y0"),
        (dict(provenance=None), r"^prompt 'p': provenance: expected Provenance"),
    ],
)
def test_bad_builder_arguments(kwargs, match):
    args = dict(y0="y0", provenance=PROVENANCE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Stage1TreeBuilder("p", X, **args)


def test_bad_prompt():
    with pytest.raises(ValueError, match=r"^prompt 'p': x\[1\]\.role: the conversation must end with a 'user'"):
        Stage1TreeBuilder("p", [*X, {"role": "assistant", "content": "a"}], "y", provenance=PROVENANCE)


def test_seeded_requests_get_distinct_seeds():
    prov = Provenance("policy", "rm", SamplingParams(seed=5))
    b = Stage1TreeBuilder("p", X, "y0", r0=0.0, k=2, m=2, provenance=prov)
    b.feed({"p/s1/r1/b0/crit/t1": ["a [[1]]", "b [[2]]"]})
    seeds = [r.sampling.seed for r in b.pending()]
    assert None not in seeds and len(set(seeds)) == 2


def drive(machine, engine, *, one_by_one=False):
    """Answer pending requests either in full batches or one key at a time in reverse order."""
    while not machine.done:
        pending = machine.pending()
        answers = {}
        for r in pending:
            answers[r.key] = engine.generate([r])[0] if isinstance(r, GenerateRequest) else engine.score([r])[0]
        if one_by_one:
            for key in sorted(answers, reverse=True):
                machine.feed({key: answers[key]})
        else:
            machine.feed(answers)
    return machine


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([0.0, 0.4, 0.95]), st.sampled_from([0.0, 0.3]), st.integers(1, 3), st.integers(1, 3))
def test_builder_is_deterministic_and_order_independent(seed, p_no_rating, p_blank, k, m):
    engine = FakeEngine(seed, p_no_rating, p_blank)
    trees = [
        drive(Stage1TreeBuilder("p", X, "y0", k=k, m=m, provenance=PROVENANCE), engine, one_by_one=flag).tree.to_dict()
        for flag in (False, True, False)
    ]
    assert trees[0] == trees[1] == trees[2]
    tree = RefinementTree.from_dict(json.loads(json.dumps(trees[0])))
    assert len({c.criticism_index for c in tree.root.children}) <= k
    assert all(sum(1 for c in tree.root.children if c.criticism_index == i) <= m for i in range(k))
    for gating in ("reference", "independent"):
        assert preference_pairs(tree, gating=gating) == preference_pairs(RefinementTree.from_dict(trees[1]), gating=gating)


# ---------------------------------------------------------------- RSFT and pairs


def make_tree(r0, groups, *, y0="the first answer", crits=None, answers=None):
    """groups[i] = rewards of the improvements under criticism i."""
    root = RefinementNode("y0", y0, reward=r0)
    for i, rewards in enumerate(groups):
        crit = crits[i] if crits else f"criticism {i} [[5]]"
        for j, r in enumerate(rewards):
            text = answers[i][j] if answers else f"improvement {i}.{j}"
            root.children.append(RefinementNode(f"r1/b0/c{i}/y{j}", text, round=1, reward=r, criticism=crit,
                                                 rating=5, criticism_index=i))
    return RefinementTree("p", X, root, PROVENANCE, k=max(len(groups), 1), m=2)


def reasons_of(tree, gating="independent", **kw):
    pairs, reasons = preference_pairs(tree, gating=gating, **kw)
    return {p["pair_type"]: p for p in pairs}, reasons


def test_rsft_accepts_best_improvement_with_gain():
    tree = make_tree(0.0, [[0.5, 2.0], [1.0, 1.5]])
    record, reason = rsft_example(tree)
    assert reason is None and record["kind"] == "rsft" and record["id"] == "p/s1/rsft"
    assert record["messages"] == [*T.improve_turns(X, "the first answer", "criticism 0 [[5]]"),
                                  {"role": "assistant", "content": "improvement 0.1"}]
    assert (record["reward"], record["reward_base"], record["reward_gain"], record["round"]) == (2.0, 0.0, 2.0, 1)


@pytest.mark.parametrize(
    "r0, groups, reason",
    [(2.0, [[2.0, 1.0]], "rsft:no_gain"), (3.0, [[2.0]], "rsft:no_gain"), (0.0, [], "rsft:no_improvement")],
)
def test_rsft_rejections(r0, groups, reason):
    assert rsft_example(make_tree(r0, groups)) == (None, reason)


def test_rsft_length_filter():
    y0 = "y" * 1000
    long = make_tree(0.0, [[1.0]], y0=y0, answers=[["n" * 1400]])
    ok = make_tree(0.0, [[1.0]], y0=y0, answers=[["n" * 1399]])
    assert rsft_example(long) == (None, "rsft:length")
    assert rsft_example(ok)[1] is None
    assert rsft_example(long, FilterConfig(length_extra_chars=401))[1] is None
    # The filter applies to the best improvement; a shorter, worse one is not substituted.
    mixed = make_tree(0.0, [[2.0, 1.0]], y0=y0, answers=[["n" * 1400, "short"]])
    assert rsft_example(mixed) == (None, "rsft:length")


def test_incomplete_tree_is_refused():
    tree = make_tree(0.0, [[1.0]])
    tree.root.children[0].reward = None
    with pytest.raises(ValueError, match="node 'r1/b0/c0/y0': has no reward"):
        rsft_example(tree)
    tree.root.reward = None
    with pytest.raises(ValueError, match="tree 'p': y0 has no reward"):
        preference_pairs(tree)


@pytest.mark.parametrize("gating", ["reference", "independent"])
def test_all_three_pairs_accepted(gating):
    tree = make_tree(1.0, [[0.5, 3.0], [1.5, 0.0]])
    pairs, reasons = reasons_of(tree, gating)
    assert reasons == []
    response, criticism, improvement = pairs["response"], pairs["criticism"], pairs["improvement"]
    assert response["prompt"] == X
    assert response["chosen"][0]["content"] == "improvement 0.1" and response["rejected"][0]["content"] == "the first answer"
    assert (response["reward_chosen"], response["reward_rejected"], response["reward_gap"]) == (3.0, 1.0, 2.0)
    assert criticism["prompt"] == [*X, {"role": "assistant", "content": "the first answer"}, {"role": "user", "content": T.criticise}]
    assert criticism["chosen"][0]["content"] == "criticism 0 [[5]]" and criticism["rejected"][0]["content"] == "criticism 1 [[5]]"
    # Criticism values are mean improvement rewards: (-0.5 + 2.0) / 2 and (0.5 - 1.0) / 2.
    assert criticism["reward_chosen"] == pytest.approx(0.75) and criticism["reward_rejected"] == pytest.approx(-0.25)
    assert criticism["reward_base"] == 1.0
    assert improvement["prompt"] == T.improve_turns(X, "the first answer", "criticism 0 [[5]]")
    assert improvement["chosen"][0]["content"] == "improvement 0.1" and improvement["rejected"][0]["content"] == "improvement 0.0"
    assert (improvement["reward_chosen"], improvement["reward_rejected"]) == (3.0, 0.5)
    for p in pairs.values():
        assert p["id"] == f"p/s1/{p['pair_type']}" and p["stage"] == 1 and p["round"] == 1 and p["model"] == "policy-test"


@pytest.mark.parametrize(
    "r0, groups, kw, expected",
    [
        # response: needs a strictly positive gain
        (3.0, [[0.5, 3.0], [1.5, 0.0]], {}, {"response:no_gain"}),
        # criticism: only one criticism survived
        (0.0, [[1.0, 2.0]], {}, {"criticism:too_few"}),
        # criticism: equal values
        (0.0, [[1.0, 2.0], [2.0, 1.0]], {}, {"criticism:no_strict_order"}),
        # criticism: best child under the best criticism below r(y0)
        (1.5, [[1.4, 1.3], [0.0, 0.0]], {}, {"criticism:best_child_below_base", "response:no_gain"}),
        # criticism: identical texts
        (0.0, [[1.0, 2.0], [0.0, 0.5]], {"crits": ["same [[5]]", "same [[5]]"]}, {"criticism:same_text"}),
        # improvement: rejected reward equal to r(y0)
        (0.5, [[0.5, 3.0], [1.0, 0.0]], {}, {"improvement:rejected_equals_base"}),
        # improvement: equal children under the best criticism
        (0.0, [[2.0, 2.0], [1.0, 0.0]], {}, {"improvement:no_strict_order"}),
        # improvement: a single child under the best criticism (m = 1)
        (0.0, [[2.0], [1.0]], {}, {"improvement:too_few"}),
        # nothing at all (every criticism dropped)
        (0.0, [], {}, {"response:no_improvement", "criticism:too_few", "improvement:no_criticism"}),
    ],
)
def test_pair_rejections(r0, groups, kw, expected):
    pairs, reasons = reasons_of(make_tree(r0, groups, **kw))
    assert set(reasons) == expected and len(reasons) == len(expected)
    assert set(pairs) | {r.split(":")[0] for r in reasons} == {"response", "criticism", "improvement"}


def test_criticism_pair_accepts_best_child_equal_to_base():
    _, reasons = reasons_of(make_tree(2.0, [[2.0, 1.0], [0.0, 0.0]]))
    assert "criticism:best_child_below_base" not in reasons


def test_repetition_filter_applies_to_every_pair_type():
    loop = "again " * 60
    pairs, reasons = reasons_of(make_tree(0.0, [[3.0, 1.0], [0.5, 0.2]], y0=loop))
    assert "response:repetition" in reasons and "criticism" in pairs and "improvement" in pairs
    pairs, reasons = reasons_of(make_tree(0.0, [[3.0, 1.0], [0.5, 0.2]], answers=[["fine", loop], ["a", "b"]]))
    assert "improvement:repetition" in reasons and "response" in pairs
    pairs, reasons = reasons_of(make_tree(0.0, [[3.0, 1.0], [0.5, 0.2]], crits=["ok [[7]]", loop + "[[2]]"]))
    assert reasons == ["criticism:repetition"]
    _, reasons = reasons_of(make_tree(0.0, [[3.0, 1.0], [0.5, 0.2]], y0=loop), filters=FilterConfig(repetition_threshold=61))
    assert reasons == []


def test_same_text_response_pair_is_dropped():
    _, reasons = reasons_of(make_tree(0.0, [[1.0]], y0="same", answers=[["same"]]))
    assert "response:same_text" in reasons


def test_best_improvement_ties():
    tree = make_tree(0.0, [[1.0, 2.0], [2.0]])
    assert best_improvement(tree, "independent").id == "r1/b0/c0/y1"  # the first
    assert best_improvement(tree).id == "r1/b0/c1/y0"  # reference: `>=` from r(y0), the last
    assert best_improvement(make_tree(2.5, [[1.0, 2.0], [2.0]])) is None  # none reaches r(y0)
    assert best_improvement(make_tree(2.0, [[1.0, 2.0], [2.0]])).id == "r1/b0/c1/y0"  # equal counts
    assert rsft_example(make_tree(0.0, [[1.0, 2.0], [2.0]]))[0]["messages"][-1]["content"] == "improvement 1.0"
    with pytest.raises(ValueError, match="gating: expected one of reference, independent, got 'both'"):
        preference_pairs(tree, gating="both")


values = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])
texts = st.sampled_from(["short", "a different answer", "again " * 60, "x" * 500])


@settings(max_examples=100, deadline=None)
@given(values, st.lists(st.lists(values, min_size=1, max_size=3), max_size=3), st.data())
def test_pair_invariants(r0, groups, data):
    crits = [data.draw(st.sampled_from(["c1 [[3]]", "c2 [[6]]", "loop " * 60 + "[[1]]"])) for _ in groups]
    answers = [[data.draw(texts) for _ in g] for g in groups]
    tree = make_tree(r0, groups, y0=data.draw(texts), crits=crits, answers=answers)
    pairs, reasons = preference_pairs(tree, gating="independent")
    types = [p["pair_type"] for p in pairs] + [r.split(":")[0] for r in reasons]
    assert sorted(types) == ["criticism", "improvement", "response"]  # one verdict per type
    means = [sum(g) / len(g) for g in groups]
    b = means.index(max(means)) if groups else None
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert p["reward_chosen"] > p["reward_rejected"] and p["reward_gap"] > 0
        assert chosen != rejected
        assert repetition_reason(chosen) is None and repetition_reason(rejected) is None
        assert p["reward_base"] == r0
        if p["pair_type"] == "response":
            assert rejected == tree.root.answer and p["reward_chosen"] - r0 > 0
            assert p["reward_chosen"] == max(c.reward for c in tree.root.children)
        elif p["pair_type"] == "criticism":
            assert chosen == crits[b] and rejected in crits and max(groups[b]) >= r0
            assert p["reward_chosen"] == pytest.approx(means[b] - r0)
            assert p["reward_rejected"] == pytest.approx(min(means) - r0)
        else:
            assert p["prompt"][-2]["content"] == crits[b]
            assert (p["reward_chosen"], p["reward_rejected"]) == (max(groups[b]), min(groups[b]))
            assert p["reward_rejected"] != r0
    record, reason = rsft_example(tree, gating="independent")
    best = best_improvement(tree, "independent")
    if record is not None:
        assert best.reward > r0 and record["messages"][-1]["content"] == best.answer
    else:
        assert reason in ("rsft:no_improvement", "rsft:no_gain", "rsft:length")



@settings(max_examples=150, deadline=None)
@given(values, st.lists(st.lists(values, min_size=1, max_size=3), max_size=3), st.data())
def test_reference_pair_invariants(r0, groups, data):
    """What the reference's sequence implies, whatever the tree: one verdict per pair type, an
    improvement pair only with the response pair, every chosen answer at or above r(y0)."""
    crits = [data.draw(st.sampled_from(["c1 [[3]]", "c2 [[6]]", "loop " * 60 + "[[1]]"])) for _ in groups]
    answers = [[data.draw(texts) for _ in g] for g in groups]
    tree = make_tree(r0, groups, y0=data.draw(texts), crits=crits, answers=answers)
    pairs, reasons = preference_pairs(tree)
    by_type = {p["pair_type"]: p for p in pairs}
    assert sorted([*by_type, *(r.split(":")[0] for r in reasons)]) == ["criticism", "improvement", "response"]
    if pairs:
        assert "response" in by_type
    if "response" not in by_type:
        assert not pairs
    for p in pairs:
        assert p["reward_gap"] > 0 and p["reward_base"] == r0
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        if p["pair_type"] != "criticism":
            assert p["reward_chosen"] >= r0
            assert repetition_reason(chosen) is None and repetition_reason(rejected) is None
    if "improvement" in by_type:
        assert by_type["improvement"]["reward_rejected"] != r0
    assert repetition_reason(tree.root.answer) is None or not pairs
