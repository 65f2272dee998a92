import pytest
from hypothesis import given, settings, strategies as st

from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.thoughts import (
    RefinementThought,
    escape,
    extract_final_answer,
    parse_thought,
    render_thought,
    unescape,
)

T = PromptTemplates()
THOUGHT = RefinementThought("draft", (("crit 1 [[4]]", "better"), ("crit 2 [[6]]", "best")), "crit 3 [[9]]")


def test_render_layout():
    assert render_thought(THOUGHT) == "\n".join([
        "<refinement>", "Draft answer:", "draft",
        "Review:", "crit 1 [[4]]", "Revised answer:", "better",
        "Review:", "crit 2 [[6]]", "Revised answer:", "best",
        "Review:", "crit 3 [[9]]", T.closing_line, "</refinement>",
        "Final answer:", "best",
    ])
    assert THOUGHT.final_answer == "best" and THOUGHT.answers == ["draft", "better", "best"]


def test_parse_well_formed():
    p = parse_thought(render_thought(THOUGHT))
    assert p.well_formed and p.problems == [] and p.n_rounds == 3 and p.final_answer == "best"
    assert p.answers == ["draft", "better", "best"] and p.criticisms == ["crit 1 [[4]]", "crit 2 [[6]]", "crit 3 [[9]]"]
    assert p.thought() == THOUGHT


def test_escaping_of_marker_lines():
    text = "Final answer: 42\n\\Final answer: 43\n  <refinement>  \nReview: fine\nReview:"
    assert escape(text) == "\\Final answer: 42\n\\\\Final answer: 43\n\\  <refinement>  \nReview: fine\n\\Review:"
    assert unescape(escape(text)) == text
    # Lines that only look like escapes are left alone.
    assert escape("\\not a marker") == "\\not a marker" and unescape("\\not a marker") == "\\not a marker"


def test_final_answer_containing_the_delimiter():
    thought = RefinementThought("a", (("c [[3]]", "Steps...\nFinal answer: 42"),), "c2 [[8]]")
    text = render_thought(thought)
    assert text.endswith("Final answer:\nSteps...\n\\Final answer: 42")
    assert extract_final_answer(text) == "Steps...\nFinal answer: 42"


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Final answer: 42", "42"),
        ("Final answer:\n42", "42"),
        ("Final answer:\r\n42", "42"),
        ("Final answer:\n\n42", "\n42"),
        ("Final answer:  42", " 42"),  # exactly one separator is removed
        ("  Final answer: 42", "42"),
        ("some thinking\nFinal answer: 1\nmore\nFinal answer: 2", "2"),  # the last valid one wins
        ("Final answer: 1\n<refinement>\nFinal answer: 2", "1\n<refinement>\nFinal answer: 2"),
        ("<refinement>\nDraft answer:\nx\nFinal answer: 2", None),  # inside an unclosed thought
        ("<refinement>\n</refinement>\nFinal answer: ok", "ok"),
        ("Final answer:", None),
        ("Final answer:   \n  ", None),
        ("no delimiter at all", None),
        ("The final answer: 3", None),  # not at the start of a line
        ("final answer: 3", None),  # case-sensitive
        ("\\Final answer: 3", None),  # escaped
        ("Final answer:\n\\Final answer: 3", "Final answer: 3"),
        ("", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize("value", [None, 3, b"Final answer: 1", ["Final answer: 1"]])
def test_non_strings(value):
    assert extract_final_answer(value) is None
    p = parse_thought(value)
    assert not p.well_formed and p.final_answer is None and p.problems


def problems_of(text):
    p = parse_thought(text)
    assert not p.well_formed
    return p.problems


def test_malformed_thoughts_report_problems():
    full = render_thought(THOUGHT)
    assert "missing opening marker" in problems_of(full.replace("<refinement>\n", "", 1))
    assert any("repeated opening marker" in p for p in problems_of("<refinement>\n" + full))
    assert "missing closing line" in problems_of(full.replace(T.closing_line + "\n", ""))
    assert "text before the opening marker" in problems_of("Let me think.\n" + full)
    assert "marker line after the final-answer delimiter" in problems_of(full + "\nReview:")
    assert "empty section after the review label" in problems_of(full.replace("crit 2 [[6]]", ""))
    assert "unexpected text after the closing marker" in problems_of(full.replace("</refinement>\n", "</refinement>\nextra\n"))
    assert "final-answer delimiter inside the thought" in problems_of(full.replace("crit 2 [[6]]", "Final answer: no"))
    swapped = full.replace("Revised answer:\nbetter", "Revised answer:\nbetter\nRevised answer:\nagain")
    assert any(p.startswith("sections out of order") for p in problems_of(swapped))
    # A thought whose last round is a revision (no failed review) is not well formed.
    assert any(p.startswith("sections out of order") for p in problems_of(full.replace("Review:\ncrit 3 [[9]]\n", "")))


def test_truncated_thoughts_have_no_final_answer():
    full = render_thought(THOUGHT)
    cut_at = full.index("Final answer:")
    for n in range(cut_at + 1):
        p = parse_thought(full[:n])
        assert p.final_answer is None and not p.well_formed
    assert parse_thought(full[: cut_at + len("Final answer:\nbe")]).final_answer == "be"


def test_custom_markers():
    t = PromptTemplates(thought_open="[think]", thought_close="[/think]", final_answer_prefix="ANSWER:")
    text = render_thought(THOUGHT, t)
    assert text.startswith("[think]\n") and "\nANSWER:\nbest" in text
    assert parse_thought(text, t).thought() == THOUGHT
    assert parse_thought(text).final_answer is None  # default markers do not match


def test_render_validates():
    with pytest.raises(ValueError, match=r"^thought\.steps\[0\]\.improvement: is empty"):
        RefinementThought("a", (("c", " "),), "c")
    with pytest.raises(ValueError, match=r"^thought\.failed_criticism: expected a string"):
        RefinementThought("a", (), None)
    with pytest.raises(ValueError, match="render_thought: expected a RefinementThought"):
        render_thought("text")


MARKERY = [
    *T.line_markers, T.final_answer_prefix, "Final answer: 42", "  Final answer:", " <refinement> ", "</refinement>\r",
    "\\", "\\\\", "\\<refinement>", "\\\\Review:", "\\Final answer: x", "", " ", "\r", "[[7]]",
]
piece = st.one_of(st.text(max_size=12), st.sampled_from(MARKERY))
joined = st.tuples(st.lists(piece, max_size=6), st.sampled_from(["\n", "", " ", "\n\n"])).map(lambda t: t[1].join(t[0]))
nonblank = joined.filter(lambda s: s.strip() != "")


@settings(max_examples=80, deadline=None)
@given(nonblank, st.lists(st.tuples(nonblank, nonblank), max_size=3), nonblank)
def test_render_parse_round_trip(first, steps, failed):
    thought = RefinementThought(first, tuple(steps), failed)
    text = render_thought(thought)
    p = parse_thought(text)
    assert p.problems == [] and p.well_formed
    assert p.thought() == thought
    assert p.final_answer == thought.final_answer == extract_final_answer(text)
    assert p.n_rounds == len(steps) + 1


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_escape_round_trip(text):
    assert unescape(escape(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), joined))
def test_parse_never_raises(text):
    p = parse_thought(text)
    assert isinstance(p.well_formed, bool) and p.well_formed == (p.problems == [])
    assert p.final_answer == extract_final_answer(text)
    assert p.n_rounds == len(p.criticisms)
    if p.well_formed:
        assert parse_thought(render_thought(p.thought())).thought() == p.thought()
