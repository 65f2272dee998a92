import pytest

from avr_megatron.method.machine import RequestMachine
from avr_megatron.method.requests import SamplingParams, GenerateRequest, ScoreRequest

X = [{"role": "user", "content": "Q"}]


class Echo(RequestMachine):
    """Asks for one text, then for a score of it."""

    def __init__(self):
        super().__init__("echo")
        self.reward = None
        self._issue(GenerateRequest("e/gen", X, 1, SamplingParams()), self._on_text)

    def _on_text(self, texts):
        self._issue(ScoreRequest("e/score", [*X, {"role": "assistant", "content": texts[0]}]), self._on_score)

    def _on_score(self, value):
        self.reward = value

    @property
    def done(self):
        return self.reward is not None


def test_pending_is_stable_until_fed():
    m = Echo()
    assert m.pending() == m.pending() and [r.key for r in m.pending()] == ["e/gen"]
    m.feed({"e/gen": ["hello"]})
    assert [r.key for r in m.pending()] == ["e/score"] and not m.done
    m.feed({"e/score": 2})
    assert m.done and m.reward == 2.0 and m.pending() == []


def test_feed_rejects_unknown_repeated_and_bad_values():
    m = Echo()
    with pytest.raises(ValueError, match="echo: result for 3: no such pending request"):
        m.feed({3: 1.0})
    with pytest.raises(ValueError, match="result for 'e/gen': expected a list of 1 strings"):
        m.feed({"e/gen": "hello"})
    m.feed({"e/gen": ["hello"]})
    with pytest.raises(ValueError, match="echo: result for 'e/gen': no such pending request"):
        m.feed({"e/gen": ["hello"]})


def test_a_key_is_never_issued_twice():
    m = Echo()
    with pytest.raises(RuntimeError, match="issued twice"):
        m._issue(GenerateRequest("e/gen", X, 1, SamplingParams()), lambda v: None)
