"""synth.thoughts.answer_fallback (test models only): a sampled thought without a final answer
gets a marked one; answered thoughts and other requests are untouched; off by default."""

from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import GenerateRequest, SamplingParams, make_key
from avr_megatron.method.thoughts import extract_final_answer
from avr_megatron.synth.fallback import THOUGHT_MARK, CriticismCounter, with_final_answer

T = PromptTemplates()
X = [{"role": "user", "content": "q"}]


def test_fallback_answer_is_marked_and_extractable_even_inside_an_open_thought():
    text = f"{T.thought_open}\n{T.draft_label}\nfirst try\n"
    final = extract_final_answer(with_final_answer(text, T), T)
    assert final.startswith(THOUGHT_MARK) and "first try" in final
    good = f"{T.thought_open}\n{T.draft_label}\na\n{T.thought_close}\n{T.final_answer_prefix} 42"
    assert with_final_answer(good, T) is None


def _request(*parts):
    key = make_key("p1", *parts)
    return GenerateRequest(key, X, 2, SamplingParams().for_key(key))


def test_counter_applies_it_to_thought_requests_only_when_enabled():
    good = f"{T.thought_open}\n{T.draft_label}\na\n{T.thought_close}\n{T.final_answer_prefix} 42"
    for enabled in (False, True):
        counter = CriticismCounter(T, enabled=False, thought_fallback=enabled)
        thoughts = [["no delimiter", good]]
        other = [["no delimiter", "x"]]
        counter([_request("s2", "thoughts")], thoughts)
        counter([_request("s1", "y0")], other)
        assert other == [["no delimiter", "x"]] and thoughts[0][1] == good
        assert (extract_final_answer(thoughts[0][0], T) is not None) == enabled
        assert counter.thoughts_fired["p1"] == (1 if enabled else 0)
