import pytest
from hypothesis import given, settings, strategies as st

from avr_megatron.method.ratings import extract_rating


@pytest.mark.parametrize(
    "text, rating",
    [
        ("Good. Score: [[7]]", 7),
        ("[[1]]", 1),
        ("[[10]]", 10),
        ("[[11]]", None),
        ("[[0]]", None),
        ("[[7.5]]", None),
        ("[[07]]", None),
        ("[[ 7 ]]", None),
        ("[[-3]]", None),
        ("[7]", None),
        ("rating 7/10", None),
        ("", None),
        ("first [[3]], then [[8]]", 8),
        ("first [[3]], then [[11]]", 3),  # the last VALID one wins
        ("[[[9]]]", 9),
        ("[[100]]", None),
        ("[[١]]", None),  # non-ASCII digit
    ],
)
def test_extract_rating(text, rating):
    assert extract_rating(text) == rating


@pytest.mark.parametrize("value", [None, 7, b"[[7]]", ["[[7]]"]])
def test_non_strings_give_none(value):
    assert extract_rating(value) is None


@settings(max_examples=100, deadline=None)
@given(st.text(), st.integers(1, 10), st.text(alphabet="abc .!\n"))
def test_appended_rating_wins_and_never_raises(prefix, n, suffix):
    assert extract_rating(prefix + f"[[{n}]]" + suffix) == n
    r = extract_rating(prefix)
    assert r is None or 1 <= r <= 10
