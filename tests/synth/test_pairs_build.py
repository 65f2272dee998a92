"""`avr pairs` data building on hand-made stage rows (no models): the RSFT mix of source chosen
conversations, de-duplication over the whole output, the gating option, the summary's counts."""

import json

from avr_megatron.config import load_config
from avr_megatron.method.thoughts import RefinementThought, render_thought
from avr_megatron.method.tree import Provenance, RefinementNode, RefinementTree
from avr_megatron.synth.passes import build_stage1, build_stage2

PROVENANCE = Provenance("policy", "rm")


def x_of(q):
    return [{"role": "user", "content": q}]


def stage1_row(prompt_id, q, y0, r0, crits, chosen=None, status="ok"):
    """crits: [(criticism text, [(improvement text, reward), ...]), ...]."""
    root = RefinementNode("y0", y0, reward=r0)
    for i, (criticism, kids) in enumerate(crits):
        for j, (text, reward) in enumerate(kids):
            root.children.append(RefinementNode(f"r1/b0/c{i}/y{j}", text, round=1, reward=reward,
                                                criticism=criticism, rating=5, criticism_index=i))
    tree = RefinementTree(prompt_id, x_of(q), root, PROVENANCE)
    return {"prompt_id": prompt_id, "status": status, "criticism_samples": 2, "rating_fallbacks": 0,
            "source_chosen": chosen, "tree": json.dumps(tree.to_dict()) if status == "ok" else None}


STANDARD = [("c0 [[6]]", [("better", 3.0), ("worse", 0.5)]), ("c1 [[4]]", [("meh", 1.5), ("bad", 0.2)])]
BELOW = [("c0 [[6]]", [("a", 1.0), ("b", 2.0)]), ("c1 [[4]]", [("c", 3.0), ("d", 4.0)])]  # r0 = 5


def cfg_of(*overrides):
    return load_config(None, ["synth.input.fields.chosen=chosen", *overrides])


def test_rsft_mix_dedup_and_counts():
    rows = [
        # y0 is the chosen answer and has an RSFT example: its chosen conversation is not mixed in.
        stage1_row("p0", "Q0", "y", 0.0, STANDARD, chosen=[*x_of("Q0"), {"role": "assistant", "content": "y"}]),
        # The same prompt and tree under another id (a duplicated source row): every record repeats.
        stage1_row("p1", "Q0", "y", 0.0, STANDARD, chosen=[*x_of("Q0"), {"role": "assistant", "content": "y"}]),
        # No RSFT example (nothing beats y0): its chosen conversation is mixed in ...
        stage1_row("p2", "Q2", "y", 5.0, BELOW, chosen=[*x_of("Q2"), {"role": "assistant", "content": "src"}]),
        # ... once, though another row carries the same one; a failed tree still contributes its own.
        stage1_row("p3", "Q2", "y", 5.0, BELOW, chosen=[*x_of("Q2"), {"role": "assistant", "content": "src"}]),
        stage1_row("p4", "Q4", None, None, [], chosen=[*x_of("Q4"), {"role": "assistant", "content": "s4"}],
                   status="y0_blank"),
    ]
    summary, sft, pairs = build_stage1(rows, cfg_of(), mix_source_chosen=True)
    kinds = sorted((r["kind"], r["prompt_id"]) for r in sft)
    assert kinds == [("rsft", "p0"), ("source", "p2"), ("source", "p4")]
    assert sorted((p["pair_type"], p["prompt_id"]) for p in pairs) == [
        ("criticism", "p0"), ("improvement", "p0"), ("response", "p0")]
    assert summary.accepted == {"rsft": 1, "source_chosen": 2, "response": 1, "criticism": 1, "improvement": 1}
    assert summary.rejected["source_chosen:used_as_y0"] == 2
    assert summary.rejected["source_chosen:duplicate"] == 1
    assert summary.rejected["rsft:duplicate"] == 1 and summary.rejected["rsft:no_gain"] == 2
    for t in ("response", "criticism", "improvement"):
        assert summary.rejected[f"{t}:duplicate"] == 1
    # The reference drops every pair of a prompt whose improvements are all below r(y0).
    assert summary.rejected["response:below_base"] == 2 and summary.rejected["improvement:after_response"] == 2
    report = summary.report()
    assert report["duplicates_removed"] == {"criticism": 1, "improvement": 1, "response": 1, "rsft": 1,
                                            "source_chosen": 1}
    assert report["pairs_by_type"] == {"response": 1, "criticism": 1, "improvement": 1, "thought": 0}
    # Without the mix, only RSFT examples.
    _, sft, _ = build_stage1(rows, cfg_of())
    assert [r["kind"] for r in sft] == ["rsft"]


def test_independent_gating_is_one_option_away():
    rows = [stage1_row("p2", "Q2", "y", 5.0, BELOW)]
    _, _, reference = build_stage1(rows, cfg_of())
    summary, _, independent = build_stage1(rows, cfg_of("synth.pairs.gating=independent"))
    assert reference == []
    # Independent rules keep an improvement pair whose chosen answer (4.0) is below r(y0) = 5.
    assert [(p["pair_type"], p["reward_chosen"]) for p in independent] == [("improvement", 4.0)]
    assert summary.rejected == {"rsft:no_gain": 1, "response:no_gain": 1, "criticism:best_child_below_base": 1}


def test_sft_order_is_shuffled_by_the_seed():
    rows = [stage1_row(f"p{i}", f"Q{i}", "y", 5.0, BELOW, chosen=[*x_of(f"Q{i}"), {"role": "assistant", "content": "s"}])
            for i in range(12)]
    order = lambda seed: [r["prompt_id"] for r in build_stage1(rows, cfg_of(f"run.seed={seed}"), mix_source_chosen=True)[1]]
    assert order(1) == order(1) and sorted(order(1)) == sorted(f"p{i}" for i in range(12))
    assert order(1) != order(2) or order(1) != order(3)


def test_stage2_duplicates_are_removed_and_counted():
    def thoughts_row(prompt_id):
        texts = [render_thought(RefinementThought("first", (("crit", "good"),), "c")),
                 render_thought(RefinementThought("first", (("crit", "a much longer answer"),), "c"))]
        samples = [{"text": texts[0], "final_answer": "good", "reward": 2.0},
                   {"text": texts[1], "final_answer": "a much longer answer", "reward": 1.0}]
        return {"prompt_id": prompt_id, "row": 0, "status": "ok", "x": x_of("Q"), "source_reward": 0.5,
                "samples": samples, "provenance": json.dumps(PROVENANCE.to_dict())}

    summary, _, pairs = build_stage2([], [thoughts_row("a"), thoughts_row("b"), thoughts_row("c")], cfg_of())
    assert [p["prompt_id"] for p in pairs] == ["a"]
    assert summary.accepted == {"thought": 1} and summary.rejected == {"thought:duplicate": 2}
    assert summary.report()["duplicates_removed"] == {"thought": 2}
