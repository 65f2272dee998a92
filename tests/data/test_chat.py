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
    # The generation prompt is not a prefix: the turn's header is trained as well.
    assert _masked_text(thinking, enc) == ["<|im_start|>assistant\nA better answer here.<|im_end|>\n"]


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
    enc = chat.encode_completion(prompt, [{"role": "assistant", "content": "Short."}], "rec")
    assert _masked_text(tokenizer, enc) == ["Short.<|eot_id|>"]
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(copy.deepcopy(tokenizer))
    assert fp != tokenizer_fingerprint(_with_template(tokenizer, CHATML))
