import itertools
import string

import pytest

from avr_megatron.method.filters import FilterConfig, length_reason, most_repeated, repetition_reason


def distinct_words(n):
    """n different letter-only words."""
    return ["".join(p) for p in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), n)]


def test_word_repetition_threshold_is_inclusive():
    assert repetition_reason("again " * 59) is None
    assert repetition_reason("again " * 60) == "repetition"
    # Case-insensitive words.
    assert repetition_reason(" ".join(["Again", "again"] * 30)) == "repetition"


def test_digit_and_symbol_runs():
    words = distinct_words(60)
    assert repetition_reason(" ".join(w + "!" for w in words[:59])) is None
    assert repetition_reason(" ".join(w + "!" for w in words)) == "repetition"
    assert repetition_reason(" ".join(f"{w} 42" for w in words)) == "repetition"
    # Only spaces are removed before reading runs: "1 2 3 1 2 3 ..." is one run "123123..." ...
    assert repetition_reason("x " + "1 2 3 " * 30) is None
    assert repetition_reason("x " + "1 2 3 " * 60) == "repetition"  # (as words, "1" occurs 60 times)
    # ... but newlines stay, so a paragraph break between distinct words is a run of its own.
    assert repetition_reason("\n\n".join(distinct_words(60))) is None  # 59 breaks
    assert repetition_reason("\n\n".join(distinct_words(61))) == "repetition"  # 60 breaks
    assert repetition_reason(" ".join(distinct_words(61))) is None  # spaces never form a run
    assert repetition_reason("\t".join(distinct_words(61))) == "repetition"
    assert repetition_reason("a" + "=" * 500) is None  # one long run occurs once


def test_words_of_latin_text_and_characters_of_other_text():
    # With a Latin letter: `\b\w+\b` words of the lowercased text (digits and underscores are
    # word characters: "x_1" is one word).
    assert repetition_reason(" ".join(["Again", "again"] * 30)) == "repetition"
    assert repetition_reason("x_1 " * 59) is None and repetition_reason("x_1 " * 60) == "repetition"
    assert repetition_reason("A" + "好" * 60) is None  # "a好好...好" is one word
    # Without one (CJK, digits and symbols only): every character is a token, spaces included.
    assert repetition_reason("好" * 59) is None
    assert repetition_reason("好" * 60) == "repetition"
    assert most_repeated("好的好") == ("好", 2)
    assert repetition_reason("=" * 60) == "repetition"
    assert most_repeated("1 2 3") == (" ", 2)
    assert repetition_reason("1 " * 60) == "repetition"
    assert repetition_reason("é" * 60) == "repetition"  # no a-z/A-Z letter: characters


def test_threshold_is_configurable():
    cfg = FilterConfig(repetition_threshold=3)
    assert repetition_reason("a b a c a", cfg) == "repetition"
    assert repetition_reason("a b a c", cfg) is None
    assert most_repeated("") is None and repetition_reason("") is None


@pytest.mark.parametrize(
    "y0_len, new_len, dropped",
    [
        (1000, 1400, True),  # +400 chars and 1.4x: both thresholds met exactly/over
        (1000, 1399, False),  # +399: not enough extra characters
        (3000, 3600, True),  # +600 and exactly 1.2x
        (3000, 3599, False),  # +599 but 1.1997x: ratio not reached
        (100, 499, False),
        (100, 500, True),
        (0, 400, True),
        (500, 100, False),
    ],
)
def test_length_filter_at_exact_thresholds(y0_len, new_len, dropped):
    assert (length_reason("n" * new_len, "o" * y0_len) == "length") is dropped


def test_length_thresholds_are_configurable():
    cfg = FilterConfig(length_extra_chars=10, length_ratio=2)
    assert length_reason("n" * 20, "o" * 10, cfg) == "length"
    assert length_reason("n" * 19, "o" * 10, cfg) is None
    assert FilterConfig.from_dict({"length_ratio": 1.5}).length_ratio == 1.5


@pytest.mark.parametrize(
    "d, match",
    [
        ({"threshold": 3}, r"^synthesis\.filters\.threshold: unknown field"),
        ({"repetition_threshold": 0}, r"^synthesis\.filters\.repetition_threshold: expected an integer >= 1"),
        ({"length_extra_chars": 1.5}, r"^synthesis\.filters\.length_extra_chars"),
        ({"length_ratio": float("nan")}, r"^synthesis\.filters\.length_ratio"),
        ({"length_ratio": True}, r"^synthesis\.filters\.length_ratio"),
    ],
)
def test_bad_config(d, match):
    with pytest.raises(ValueError, match=match):
        FilterConfig.from_dict(d, "synthesis.filters")


def test_filters_reject_non_strings():
    with pytest.raises(ValueError, match="repetition filter"):
        repetition_reason(None)
    with pytest.raises(ValueError, match="length filter: y0"):
        length_reason("a", 3)
