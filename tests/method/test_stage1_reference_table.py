"""Stage-1 pair rules on hand-built trees, table-driven.

Every expectation below was worked out by hand from the note's steps
(/work/shared/notes/avr-method.md, "The authors' reference behaviour": steps 1-5 and the
degenerate-text check) for `reference`, and from the per-type rules in
`avr_megatron.method.stage1.preference_pairs` for `independent`; none is computed by the code
under test. Letters: R = response pair, C = criticism pair, I = improvement pair.

A tree is y0 with r(y0), then its criticisms in slot order, each with its improvements as
(text, reward). Unnamed improvements are called "<slot>.<index>" (e.g. "0.1").
"""

import itertools
import string

import pytest
from method_fakes import PROVENANCE, X

from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.stage1 import preference_pairs, rsft_example
from avr_megatron.method.tree import RefinementNode, RefinementTree

T = PromptTemplates()
LOOP = "again " * 60  # one word 60 times: degenerate
WORDS = ["".join(w) for w in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 61)]
NEWLINE_RUNS = "\n\n".join(WORDS)  # 61 distinct words, 60 paragraph breaks: degenerate
SPACED = " ".join(WORDS)  # 61 distinct words, 60 spaces: not degenerate (spaces are removed)
CJK_60 = "好" * 60  # no Latin letter: characters are tokens, 60 x "好": degenerate
CJK_59 = "好" * 59
CJK_LATIN = "A" + "好" * 60  # a Latin letter: one word "a好...好": not degenerate
STANDARD = [("c0 [[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.5, 0.2])]  # r0 = 0: R C I in both modes


def tree_of(r0, crits, y0="the first answer"):
    root = RefinementNode("y0", y0, reward=r0)
    for i, (criticism, kids) in enumerate(crits):
        for j, kid in enumerate(kids):
            text, reward = kid if isinstance(kid, tuple) else (f"{i}.{j}", kid)
            root.children.append(RefinementNode(f"r1/b0/c{i}/y{j}", text, round=1, reward=reward,
                                                criticism=criticism, rating=5, criticism_index=i))
    return RefinementTree("p", X, root, PROVENANCE, k=max(len(crits), 1), m=2)


# id, r0, criticisms, y0 (None: plain), reference pairs, reference reasons, independent pairs,
# and the (chosen, rejected) texts to check per mode: {"ref"/"ind": {letter: (chosen, rejected)}}.
CASES = [
    ("all_three", 1.0, [("c0 [[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.5, 0.0])], None,
     "RCI", [], "RCI",
     {"ref": {"R": ("0.1", "the first answer"), "C": ("c0 [[6]]", "c1 [[4]]"), "I": ("0.1", "0.0")}}),
    ("best_equals_base_no_gain", 3.0, [("c0 [[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.5, 0.0])], None,
     "", ["response:no_gain", "criticism:after_response", "improvement:after_response"], "CI", {}),
    ("all_below_base", 5.0, [("c0 [[6]]", [1.0, 2.0]), ("c1 [[4]]", [3.0, 4.0])], None,
     "", ["response:below_base", "criticism:after_response", "improvement:after_response"], "I",
     {"ind": {"I": ("1.1", "1.0")}}),
    ("best_ties_last_wins", 0.0, [("c0 [[6]]", [("A", 2.0), ("B", 1.0)]), ("c1 [[4]]", [("C", 2.0), ("D", 0.5)])],
     None, "RCI", [], "RCI",
     {"ref": {"R": ("C", "the first answer"), "I": ("A", "B")}, "ind": {"R": ("A", "the first answer")}}),
    ("equal_means", 0.0, [("c0 [[6]]", [1.0, 2.0]), ("c1 [[4]]", [2.0, 1.0])], None,
     "R", ["criticism:no_strict_order", "improvement:after_criticism"], "RI",
     {"ref": {"R": ("1.0", "the first answer")}, "ind": {"R": ("0.1", "the first answer"), "I": ("0.1", "0.0")}}),
    ("same_criticism_text", 0.0, [("same [[5]]", [1.0, 2.0]), ("same [[5]]", [0.0, 0.5])], None,
     "R", ["criticism:too_few", "improvement:after_criticism"], "RI", {}),
    ("one_criticism", 0.0, [("c0 [[6]]", [1.0, 2.0])], None,
     "R", ["criticism:too_few", "improvement:after_criticism"], "RI", {}),
    ("one_child_under_best", 0.0, [("c0 [[6]]", [2.0]), ("c1 [[4]]", [1.0])], None,
     "RC", ["improvement:too_few"], "RC", {}),
    ("single_improvement", 0.0, [("c0 [[6]]", [1.0])], None,
     "R", ["criticism:too_few", "improvement:after_criticism"], "R", {}),
    ("no_improvement", 0.0, [], None,
     "", ["response:no_improvement", "criticism:after_response", "improvement:after_response"], "", {}),
    ("chosen_equal_to_base", 1.0, [("c0 [[6]]", [("A", 1.0), ("B", 0.5)]), ("c1 [[4]]", [("C", 3.0), ("D", -2.0)])],
     None, "RCI", [], "RCI", {"ref": {"R": ("C", "the first answer"), "I": ("A", "B")}}),
    ("chosen_below_base", 1.0, [("c0 [[6]]", [0.9, 0.8]), ("c1 [[4]]", [3.0, -5.0])], None,
     "R", ["criticism:best_child_below_base", "improvement:chosen_below_base"], "RI", {}),
    ("best_child_below_base_one_child", 1.0, [("c0 [[6]]", [0.9]), ("c1 [[4]]", [3.0, -5.0])], None,
     "R", ["criticism:best_child_below_base", "improvement:after_criticism"], "R", {}),
    ("rejected_equals_base", 0.5, [("c0 [[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.0, 0.0])], None,
     "RC", ["improvement:rejected_equals_base"], "RC", {}),
    ("equal_children", 0.0, [("c0 [[6]]", [("A", 2.0), ("B", 2.0)]), ("c1 [[4]]", [1.0, 0.0])], None,
     "RC", ["improvement:no_strict_order"], "RC",
     {"ref": {"R": ("B", "the first answer")}, "ind": {"R": ("A", "the first answer")}}),
    ("three_criticisms_equal_best_means", 0.0,
     [("c0 [[6]]", [1.0, 2.0]), ("c1 [[4]]", [2.0, 1.0]), ("c2 [[2]]", [0.0, 0.5])], None,
     "RCI", [], "RCI",
     {"ref": {"R": ("1.0", "the first answer"), "C": ("c0 [[6]]", "c2 [[2]]"), "I": ("0.1", "0.0")},
      "ind": {"R": ("0.1", "the first answer"), "C": ("c0 [[6]]", "c2 [[2]]")}}),
    ("criticism_text_shared_by_two_slots", 0.0,
     [("A [[5]]", [3.0, 2.0]), ("B [[3]]", [1.0, 0.5]), ("A [[5]]", [0.0, -1.0])], None,
     "RCI", [], "RI",
     {"ref": {"C": ("A [[5]]", "B [[3]]"), "I": ("0.0", "2.1")}, "ind": {"I": ("0.0", "0.1")}}),
    ("lowest_child_ties_last_wins", 0.0, [("c0 [[6]]", [("A", 3.0), ("B", 1.0), ("C", 1.0)]), ("c1 [[4]]", [0.5])],
     None, "RCI", [], "RCI", {"ref": {"I": ("A", "C")}, "ind": {"I": ("A", "B")}}),
    ("same_text_as_y0", 0.0, [("c0 [[6]]", [("same", 1.0)]), ("c1 [[4]]", [("other", 0.5)])], "same",
     "RC", ["improvement:too_few"], "C", {"ref": {"R": ("same", "same")}}),
    # Degenerate texts at each position.
    ("y0_degenerate", 0.0, STANDARD, LOOP,
     "", ["response:y0_repetition", "criticism:after_response", "improvement:after_response"], "CI", {}),
    ("best_improvement_degenerate", 0.0, [("c0 [[6]]", [("fine", 0.5), (LOOP, 3.0)]), ("c1 [[4]]", [1.5, 0.2])], None,
     "", ["response:repetition", "criticism:after_response", "improvement:after_response"], "C", {}),
    ("lowest_improvement_degenerate", 0.0, [("c0 [[6]]", [(LOOP, 0.5), ("B", 3.0)]), ("c1 [[4]]", [1.5, 0.2])], None,
     "RC", ["improvement:repetition"], "RC", {}),
    ("highest_child_of_best_criticism_degenerate", 0.0,
     [("c0 [[6]]", [(LOOP, 2.0), ("b", 1.0)]), ("c1 [[4]]", [("C", 3.0), ("D", -5.0)])], None,
     "RC", ["improvement:repetition"], "RC", {"ref": {"R": ("C", "the first answer")}}),
    ("best_criticism_degenerate", 0.0, [(LOOP + "[[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.5, 0.2])], None,
     "R", ["criticism:repetition", "improvement:after_criticism"], "RI", {}),
    ("worst_criticism_degenerate", 0.0, [("c0 [[6]]", [0.5, 3.0]), (LOOP + "[[4]]", [1.5, 0.2])], None,
     "RI", ["criticism:worst_repetition"], "RI", {}),
    ("chosen_below_base_before_degenerate_criticism", 1.0, [(LOOP + "[[6]]", [0.9, 0.8]), ("c1 [[4]]", [3.0, -5.0])],
     None, "R", ["criticism:best_child_below_base", "improvement:chosen_below_base"], "RI", {}),
    # The tokenisation: newline runs count, spaces do not; text without Latin letters by character.
    ("y0_newline_runs", 0.0, STANDARD, NEWLINE_RUNS,
     "", ["response:y0_repetition", "criticism:after_response", "improvement:after_response"], "CI", {}),
    ("y0_spaced_words", 0.0, STANDARD, SPACED, "RCI", [], "RCI", {}),
    ("y0_cjk_60", 0.0, STANDARD, CJK_60,
     "", ["response:y0_repetition", "criticism:after_response", "improvement:after_response"], "CI", {}),
    ("y0_cjk_59", 0.0, STANDARD, CJK_59, "RCI", [], "RCI", {}),
    ("y0_cjk_with_latin_letter", 0.0, STANDARD, CJK_LATIN, "RCI", [], "RCI", {}),
    ("best_criticism_cjk_degenerate", 0.0, [(CJK_60 + "[[6]]", [0.5, 3.0]), ("c1 [[4]]", [1.5, 0.2])], None,
     "R", ["criticism:repetition", "improvement:after_criticism"], "RI", {}),
    ("improvement_newline_runs", 0.0, [("c0 [[6]]", [0.5, (NEWLINE_RUNS, 3.0)]), ("c1 [[4]]", [1.5, 0.2])], None,
     "", ["response:repetition", "criticism:after_response", "improvement:after_response"], "C", {}),
]
LETTER = {"response": "R", "criticism": "C", "improvement": "I"}


def letters(pairs):
    return "".join(sorted((LETTER[p["pair_type"]] for p in pairs), key="RCI".index))


def test_the_table_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_default(case):
    _, r0, crits, y0, ref, ref_reasons, _, texts = case
    tree = tree_of(r0, crits, **({"y0": y0} if y0 is not None else {}))
    pairs, reasons = preference_pairs(tree)  # the default
    assert letters(pairs) == ref
    assert reasons == ref_reasons
    assert (pairs, reasons) == preference_pairs(tree, gating="reference")
    check_texts(pairs, texts.get("ref", {}))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_independent_option(case):
    _, r0, crits, y0, _, _, ind, texts = case
    tree = tree_of(r0, crits, **({"y0": y0} if y0 is not None else {}))
    pairs, reasons = preference_pairs(tree, gating="independent")
    assert letters(pairs) == ind
    assert len(pairs) + len(reasons) == 3
    check_texts(pairs, texts.get("ind", {}))


def check_texts(pairs, expected):
    got = {LETTER[p["pair_type"]]: (p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs}
    for letter, chosen_rejected in expected.items():
        assert got[letter] == chosen_rejected, letter


def test_pair_prompts_follow_the_best_criticism_group():
    tree = tree_of(0.0, [("A [[5]]", [3.0, 2.0]), ("B [[3]]", [1.0, 0.5]), ("A [[5]]", [0.0, -1.0])])
    pairs = {p["pair_type"]: p for p in preference_pairs(tree)[0]}
    assert pairs["criticism"]["prompt"] == [*X, {"role": "assistant", "content": "the first answer"},
                                            {"role": "user", "content": T.criticise}]
    assert pairs["improvement"]["prompt"] == T.improve_turns(X, "the first answer", "A [[5]]")
    # Criticism values (mean improvement rewards) of the merged group: (3 + 2 + 0 - 1) / 4 - 0.
    assert pairs["criticism"]["reward_chosen"] == 1.0 and pairs["criticism"]["reward_rejected"] == 0.75
    assert (pairs["improvement"]["reward_chosen"], pairs["improvement"]["reward_rejected"]) == (3.0, -1.0)


@pytest.mark.parametrize(
    "r0, crits, reference, independent",
    [
        # The best improvement ties: reference takes the last (its criticism "c1"), independent the first.
        (0.0, [("c0 [[6]]", [2.0, 1.0]), ("c1 [[4]]", [2.0, 0.5])], ("c1 [[4]]", "1.0"), ("c0 [[6]]", "0.0")),
        # Best equal to r(y0): no RSFT example in either mode.
        (2.0, [("c0 [[6]]", [2.0, 1.0])], None, None),
    ],
)
def test_rsft_uses_the_same_best_improvement(r0, crits, reference, independent):
    tree = tree_of(r0, crits)
    for gating, expected in (("reference", reference), ("independent", independent)):
        record, reason = rsft_example(tree, gating=gating)
        if expected is None:
            assert record is None and reason == "rsft:no_gain"
        else:
            assert record["messages"][-3]["content"] == expected[0]
            assert record["messages"][-1]["content"] == expected[1]
