import pytest

from avr_megatron.method.requests import (
    GenerateRequest,
    SamplingParams,
    ScoreRequest,
    check_result,
    check_unique_keys,
    key_prompt_id,
    make_key,
)

X = [{"role": "user", "content": "Q"}]
XY = [*X, {"role": "assistant", "content": "A"}]


def test_keys_escape_prompt_ids():
    assert make_key("p1", "s1", "r1") == "p1/s1/r1"
    # Prompt ids with '/' or '%' cannot collide with other ids' keys.
    a, b = make_key("a/s1", "x"), make_key("a", "s1", "x")
    assert a != b and key_prompt_id(a) == "a/s1" and key_prompt_id(b) == "a"
    assert key_prompt_id(make_key("50%/2F", "x")) == "50%/2F"
    with pytest.raises(ValueError, match="prompt_id"):
        make_key("", "x")
    with pytest.raises(ValueError, match="key part"):
        make_key("p", "a/b")


def test_sampling_params_and_per_key_seeds():
    s = SamplingParams()
    assert (s.temperature, s.top_p, s.seed) == (0.7, 0.8, None)
    assert s.for_key("k") is s
    seeded = SamplingParams(seed=7)
    a, b = seeded.for_key("p/s1/r1"), seeded.for_key("p/s1/r2")
    assert a.seed != b.seed and a == seeded.for_key("p/s1/r1")
    assert 0 <= a.seed < 2**31 and a.temperature == 0.7
    assert SamplingParams.from_dict(seeded.to_dict()) == seeded


@pytest.mark.parametrize(
    "d, match",
    [
        ({"temperature": -1}, r"^stage1\.sampling\.temperature"),
        ({"top_p": 0}, r"^stage1\.sampling\.top_p"),
        ({"top_p": 1.5}, r"^stage1\.sampling\.top_p"),
        ({"max_tokens": 0}, r"^stage1\.sampling\.max_tokens"),
        ({"seed": -1}, r"^stage1\.sampling\.seed"),
        ({"seed": True}, r"^stage1\.sampling\.seed"),
        ({"topp": 0.9}, r"^stage1\.sampling\.topp: unknown field"),
    ],
)
def test_bad_sampling(d, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_dict(d, "stage1.sampling")


def test_requests_validate_their_messages():
    GenerateRequest("k", X, 2, SamplingParams())
    ScoreRequest("k", XY)
    with pytest.raises(ValueError, match=r"request 'k': messages\[1\]\.role: the conversation must end with a 'user'"):
        GenerateRequest("k", XY, 1, SamplingParams())
    with pytest.raises(ValueError, match=r"request 'k': messages\[0\]\.role: the conversation must end with a 'assistant'"):
        ScoreRequest("k", X)
    with pytest.raises(ValueError, match="request 'k': n"):
        GenerateRequest("k", X, 0, SamplingParams())


def test_check_result():
    g = GenerateRequest("g", X, 2, SamplingParams())
    assert check_result(g, ("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="result for 'g': expected 2 texts, got 1"):
        check_result(g, ["a"])
    with pytest.raises(ValueError, match=r"result for 'g'\[1\]: expected a string"):
        check_result(g, ["a", None])
    with pytest.raises(ValueError, match="result for 'g': expected a list"):
        check_result(g, "ab")
    s = ScoreRequest("s", XY)
    assert check_result(s, 1) == 1.0
    with pytest.raises(ValueError, match="result for 's': expected a finite number"):
        check_result(s, float("nan"))


def test_unique_keys():
    check_unique_keys([ScoreRequest("a", XY), ScoreRequest("b", XY)])
    with pytest.raises(ValueError, match="duplicate request key 'a'"):
        check_unique_keys([ScoreRequest("a", XY), ScoreRequest("a", XY)])
