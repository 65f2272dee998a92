import pytest

from avr_megatron.method.prompts import LINE_MARKER_FIELDS, PromptTemplates

X = [{"role": "user", "content": "Q"}]


def test_defaults_ask_for_the_rating_format():
    t = PromptTemplates()
    assert "[[" in t.criticise and "1" in t.criticise and "10" in t.criticise
    assert t.final_answer_prefix == "Final answer:"
    assert len(set(t.line_markers)) == len(LINE_MARKER_FIELDS)


def test_builders_follow_the_multi_turn_layout():
    t = PromptTemplates()
    assert t.criticise_turns(X, "y") == [*X, {"role": "assistant", "content": "y"}, {"role": "user", "content": t.criticise}]
    assert t.improve_turns(X, "y", "c") == [
        *X,
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": t.criticise},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": t.improve},
    ]


def test_builders_validate_inputs():
    t = PromptTemplates()
    with pytest.raises(ValueError, match=r"^x\[1\]\.role: the conversation must end with a 'user' turn"):
        t.criticise_turns([*X, {"role": "assistant", "content": "a"}], "y")
    with pytest.raises(ValueError, match="^answer: is empty"):
        t.criticise_turns(X, " ")
    with pytest.raises(ValueError, match="^criticism: expected a string"):
        t.improve_turns(X, "y", None)


def test_from_dict_overrides_and_round_trips():
    t = PromptTemplates.from_dict({"criticise": "Judge it. End with [[n]].", "thought_open": "<think-more>"})
    assert t.criticise == "Judge it. End with [[n]]." and t.thought_open == "<think-more>"
    assert t.improve == PromptTemplates().improve
    assert PromptTemplates.from_dict(t.to_dict()) == t
    assert PromptTemplates.from_dict(None) == PromptTemplates()


@pytest.mark.parametrize(
    "d, match",
    [
        ({"critique": "x"}, r"^synthesis\.templates\.critique: unknown field"),
        ({"improve": 3}, r"^synthesis\.templates\.improve: expected a string"),
        ({"improve": " "}, r"^synthesis\.templates\.improve: is empty"),
        ({"thought_open": "a\nb"}, r"^synthesis\.templates\.thought_open: a thought marker must be a single line"),
        ({"review_label": " Review:"}, r"^synthesis\.templates\.review_label: .*whitespace"),
        ({"thought_close": "\\end"}, r"^synthesis\.templates\.thought_close: .*backslash"),
        ({"revision_label": "Draft answer:"}, r"^synthesis\.templates\.revision_label: same text as templates\.draft_label"),
        ({"closing_line": "Final answer: done"}, r"^synthesis\.templates\.closing_line: must not start with"),
        (["criticise"], r"^synthesis\.templates: expected a mapping"),
    ],
)
def test_from_dict_rejects_bad_fields(d, match):
    with pytest.raises(ValueError, match=match):
        PromptTemplates.from_dict(d, "synthesis.templates")
