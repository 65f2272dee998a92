"""Assistant-token masks come from the template's own rendering, for any template layout."""

import copy

import numpy as np
import pytest

from avr_megatron.data.chat import ChatTokenizer, tokenizer_fingerprint
from avr_megatron.data.records import DataError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Write a short poem."},
    {"role": "assistant", "content": "The answer is good."},
    {"role": "user", "content": "Improve it."},
    {"role": "assistant", "content": "A better answer here."},
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Generation prompt adds an empty reasoning block that past turns do not have.
THINKING = CHATML.replace("<|im_start|>assistant\n{% endif %}",
                          "<|im_start|>assistant\n<think></think>{% endif %}")
# Rewrites earlier assistant turns (keeps only their first word).
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split(' ')[0] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def _masked_text(tok, enc):
    """Decode each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(enc.ids.tolist(), enc.mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_llama3_template_masks_assistant_content_and_end_of_turn(tokenizer):
    chat = ChatTokenizer(tokenizer)
    enc = chat.encode(CONV, "all", "rec")
    assert enc.ids.dtype == np.int32 and len(enc.ids) == len(enc.mask)
    assert _masked_text(tokenizer, enc) == ["The answer is good.<|eot_id|>",
                                            "A better answer here.<|eot_id|>"]
    last = chat.encode(CONV, "last", "rec")
    assert _masked_text(tokenizer, last) == ["A better answer here.<|eot_id|>"]
    assert np.array_equal(last.ids, enc.ids)
    # The whole rendering is tokenised once: ids equal the template's own tokenisation.
    ref = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert enc.ids.tolist() == tokenizer(ref, add_special_tokens=False)["input_ids"]


def test_other_template_layouts(tokenizer):
    chatml = _with_template(tokenizer, CHATML)
    enc = ChatTokenizer(chatml).encode(CONV, "all", "rec")
    assert _masked_text(chatml, enc) == ["The answer is good.<|im_end|>\n",
                                         "A better answer here.<|im_end|>\n"]
    thinking = _with_template(tokenizer, THINKING)
    enc = ChatTokenizer(thinking).encode(CONV, "last", "rec")
    # The generation prompt adds `<think></think>`, which the conversation lacks: the turn starts
    # where the two renderings part, after the header (which is not trained).
    assert _masked_text(thinking, enc) == ["A better answer here.<|im_end|>\n"]


def test_rewriting_template_is_reported(tokenizer):
    rewriting = _with_template(tokenizer, REWRITING)
    chat = ChatTokenizer(rewriting)
    assert _masked_text(rewriting, chat.encode(CONV, "last", "f.jsonl: line 3")) == [
        "A better answer here.<|im_end|>\n"]
    with pytest.raises(DataError, match=r"f.jsonl: line 3: the chat template renders the "
                                        r"conversation through turn 2 differently"):
        chat.encode(CONV, "all", "f.jsonl: line 3")


def test_completion_and_fingerprint(tokenizer):
    chat = ChatTokenizer(tokenizer)
    prompt = CONV[:4]
    enc, other = chat.encode_pair(prompt, [{"role": "assistant", "content": "Short."}],
                                  [{"role": "assistant", "content": "Longer one."}], "rec")
    assert _masked_text(tokenizer, enc) == ["Short.<|eot_id|>"]
    assert _masked_text(tokenizer, other) == ["Longer one.<|eot_id|>"]
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(copy.deepcopy(tokenizer))
    assert fp != tokenizer_fingerprint(_with_template(tokenizer, CHATML))


def _trl_reference(tok, prompt, chosen, rejected):
    """TRL 1.16 DPOTrainer's split of a conversational pair, written plainly: tokenize the prompt
    rendered with the generation prompt and prompt + completion rendered without it; the
    completion is every token after the common token prefix (the shorter of the two pairs')."""
    def ids(messages, gen):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return tok(text, add_special_tokens=False)["input_ids"]

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    p, c, r = ids(prompt, True), ids(prompt + chosen, False), ids(prompt + rejected, False)
    n = min(common(p, c), common(p, r))
    return [(seq, [False] * n + [True] * (len(seq) - n)) for seq in (c, r)]


PROMPT = [{"role": "user", "content": "Write a short poem."}]
MULTI = [{"role": "assistant", "content": "Roses are red."},
         {"role": "user", "content": "Make it rhyme better."},
         {"role": "assistant", "content": "Roses are red, violets are blue."}]
SINGLE = [{"role": "assistant", "content": "A poem."}]
ANGLE = [{"role": "assistant", "content": "<b>bold</b> poem"}]  # starts like `<think>`


@pytest.mark.parametrize("template", [None, CHATML, THINKING], ids=["llama3", "chatml", "thinking"])
@pytest.mark.parametrize("chosen,rejected", [(MULTI, SINGLE), (SINGLE, ANGLE), (ANGLE, MULTI)],
                         ids=["multi-single", "single-angle", "angle-multi"])
def test_pairs_are_split_as_trl_does(tokenizer, template, chosen, rejected):
    """Several messages in chosen/rejected are all completion (they were scored on their final
    turn only), and a generation prompt that adds text leaves the assistant header out of the
    completion (it was trained): both as TRL's DPOTrainer does."""
    tok = tokenizer if template is None else _with_template(tokenizer, template)
    ours = ChatTokenizer(tok).encode_pair(PROMPT, chosen, rejected, "rec")
    for enc, (ids, mask) in zip(ours, _trl_reference(tok, PROMPT, chosen, rejected)):
        assert enc.ids.tolist() == ids
        assert enc.mask.tolist() == mask, (_masked_text(tok, enc), tok.decode(
            [i for i, m in zip(ids, mask) if m]))


def test_preference_data_counts_what_it_read_like_trl(tokenizer, caplog):
    from avr_megatron.data.records import PreferenceRecord
    from avr_megatron.data.tokenized import tokenize_preferences

    def rec(i, chosen):
        return PreferenceRecord(f"r{i}", tuple(PROMPT), tuple(chosen), tuple(SINGLE), None, f"f: line {i}")

    records = [rec(0, MULTI), rec(1, SINGLE), rec(2, MULTI)]
    with caplog.at_level("WARNING"):
        data = tokenize_preferences(records, ChatTokenizer(_with_template(tokenizer, THINKING)), 512,
                                    "drop")
    assert data.summary.notes == {"multi_message_completions": 2,
                                  "generation_prompt_not_in_conversation": 3}
    assert "2 of 3 preference records have a chosen or rejected of several messages" in caplog.text
    assert "3 of 3 preference records are rendered by a chat template whose generation prompt" \
        in caplog.text
