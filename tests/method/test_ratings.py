import pytest
from hypothesis import given, settings, strategies as st

from avr_megatron.method.ratings import extract_rating


@pytest.mark.parametrize(
    "text, first, last",
    [
        ("Good. Score: [[7]]", 7, 7),
        ("[[1]]", 1, 1),
        ("[[10]]", 10, 10),
        ("[[11]]", None, None),
        ("[[0]]", None, None),
        ("[[7.5]]", None, None),
        ("[[07]]", 7, None),  # the reference reads any digits and checks the value
        ("[[ 7 ]]", None, None),
        ("[[-3]]", None, None),
        ("[7]", None, None),
        ("rating 7/10", None, None),
        ("", None, None),
        ("first [[3]], then [[8]]", 3, 8),
        ("first [[3]], then [[11]]", 3, 3),
        ("first [[11]], then [[3]]", None, 3),  # "first": the first bracketed number decides
        ("first [[7.5]], then [[3]]", 3, 3),  # [[7.5]] is not [[digits]]
        ("[[[9]]]", 9, 9),
        ("[[100]]", None, None),
        ("[[١]]", 1, None),  # a non-ASCII digit is a digit to the reference's \d
    ],
)
def test_extract_rating(text, first, last):
    assert extract_rating(text) == first  # "first" is the default
    assert extract_rating(text, "first") == first
    assert extract_rating(text, "last") == last


@pytest.mark.parametrize("value", [None, 7, b"[[7]]", ["[[7]]"]])
def test_non_strings_give_none(value):
    assert extract_rating(value) is None and extract_rating(value, "last") is None


def test_unknown_parse_is_refused():
    with pytest.raises(ValueError, match="rating parse: expected one of first, last, got 'middle'"):
        extract_rating("[[3]]", "middle")


@settings(max_examples=100, deadline=None)
@given(st.text(), st.integers(1, 10), st.text(alphabet="abc .!\n"))
def test_appended_rating_wins_under_last_and_never_raises(prefix, n, suffix):
    assert extract_rating(prefix + f"[[{n}]]" + suffix, "last") == n
    for parse in ("first", "last"):
        r = extract_rating(prefix, parse)
        assert r is None or 1 <= r <= 10


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abc .!\n[]"), st.integers(1, 10), st.text())
def test_prepended_rating_wins_under_first(prefix, n, suffix):
    assert extract_rating(prefix + f"[[{n}]]" + suffix, "first") == n
