"""Chat conversations -> token ids and an assistant-token mask, through the model's own chat
template.

No template layout is assumed. For an assistant turn i, the template is rendered for the
conversation up to turn i with the generation prompt (the text the model sees before it starts
answering) and for the conversation including turn i; the turn's span starts where the first
rendering stops agreeing with the whole conversation's (after the assistant header; a generation
prompt that adds text the conversation lacks, e.g. an empty reasoning block, leaves that text out
instead of training the header) and ends with the second rendering (its content plus whatever the
template closes a turn with, e.g. `<|eot_id|>`, which the model must learn to emit). The
conversation before the turn must render as a prefix of the whole one; a template that rewrites
earlier turns (e.g. strips reasoning from past turns) breaks that, and the record is reported
instead of being masked wrongly.

Preference pairs follow TRL's DPOTrainer (TRL's conversational format is our format): the
completion is every token after the prompt, so a `chosen`/`rejected` of several messages is
trained and scored on all of them, and the prompt ends where the renderings of prompt +
completion part from the prompt rendered with the generation prompt (the earlier point of the
two completions).

The full rendering is tokenised once (`add_special_tokens=False`: templates write their own BOS),
and a token is an assistant token when it overlaps an assistant span and does not start after
it ends.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from avr_megatron.data.records import DataError


Rendered = tuple[str, list[tuple[int, int]]]  # text, character spans of the trained tokens


@dataclass(frozen=True)
class Encoded:
    """One tokenised sequence: ids and, per token, whether it is a trained assistant token."""

    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory not found: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{path}: the tokenizer has no chat template")
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{path}: a fast (Rust) tokenizer is needed for offset mapping")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """Hash of everything that decides token ids: vocabulary/merges/normaliser (the backend
    tokenizer's JSON), the chat template and the special tokens."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    template = tok.chat_template if isinstance(tok.chat_template, str) else repr(
        sorted(tok.chat_template.items()))
    h.update(template.encode())
    h.update(repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]


class ChatTokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)

    def _render(self, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
        try:
            text = self.tok.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raise_exception(...) for unsupported role orders, ...
            raise DataError(f"{where}: the chat template cannot render this conversation: "
                            f"{e}") from e
        if not isinstance(text, str):
            raise DataError(f"{where}: apply_chat_template returned {type(text).__name__}, "
                            "expected text")
        return text

    def _boundary(self, messages: Sequence[dict], i: int, full: str, where: str,
                  with_gen: str | None = None) -> int:
        """Where assistant turn i starts in `full`, split as TRL's DPOTrainer splits prompt and
        completion: after the longest common prefix of the conversation before turn i rendered
        with the generation prompt and the whole conversation's rendering. The assistant header
        stays outside the turn, also when the generation prompt adds text that the conversation
        does not contain (e.g. an empty reasoning block): that text is simply not there. The
        conversation before turn i (without the generation prompt) must be a prefix of `full`:
        a template that rewrites earlier turns is reported, not masked wrongly."""
        if i == 0:  # a conversation that opens with an assistant turn
            before = ""
        else:
            before = self._render(messages[:i], False, where)
            if not full.startswith(before):
                raise DataError(
                    f"{where}: the chat template renders the conversation before turn {i} "
                    "differently from the same turns inside the whole conversation, so the "
                    "assistant tokens cannot be located (templates that rewrite earlier turns "
                    "are not supported)")
        if with_gen is None:
            try:
                with_gen = self._render(messages[:i], True, where)
            except DataError:
                if i:
                    raise
                with_gen = ""
        return max(len(before), _common_prefix(with_gen, full))

    def _span(self, messages: Sequence[dict], i: int, full: str, where: str) -> tuple[int, int]:
        """Character span of assistant turn i inside the full rendering."""
        start = self._boundary(messages, i, full, where)
        upto = full if i == len(messages) - 1 else self._render(messages[: i + 1], False, where)
        if not full.startswith(upto):
            raise DataError(
                f"{where}: the chat template renders the conversation through turn {i} "
                "differently from the same turns inside the whole conversation, so the "
                "assistant tokens cannot be located (templates that rewrite earlier turns "
                "are not supported)")
        if len(upto) <= start:
            raise DataError(f"{where}: assistant turn {i} renders to no text")
        return start, len(upto)

    def render_pair(self, prompt: Sequence[dict], chosen: Sequence[dict],
                    rejected: Sequence[dict], where: str, info: dict | None = None
                    ) -> tuple[Rendered, Rendered]:
        """Chosen and rejected rendered after the prompt, each trained (and scored) on every
        token after the prompt, as TRL's DPOTrainer does: a completion of several messages
        (assistant, user, assistant) counts all of them, and the prompt ends where both
        renderings part from the prompt rendered with the generation prompt (the earlier of
        the two). `info["generation_prompt_fits"]`: is the prompt rendered with the generation
        prompt a prefix of both renderings (False: the template's generation prompt adds text)."""
        n = len(prompt)
        fulls = [self._render([*prompt, *c], False, where) for c in (chosen, rejected)]
        with_gen = self._render(prompt, True, where)
        if info is not None:
            info["generation_prompt_fits"] = all(full.startswith(with_gen) for full in fulls)
        start = min(self._boundary([*prompt, *c], n, full, where, with_gen)
                    for c, full in zip((chosen, rejected), fulls))
        for full in fulls:
            if len(full) <= start:
                raise DataError(f"{where}: a completion renders to no text")
        return (fulls[0], [(start, len(fulls[0]))]), (fulls[1], [(start, len(fulls[1]))])

    def render(self, messages: Sequence[dict], train_turns: str,
               where: str) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans of its trained assistant turns
        (train_turns: "all" assistant turns or only the "last" one)."""
        full = self._render(messages, False, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_turns == "last":
            turns = turns[-1:]
        return full, [self._span(messages, i, full, where) for i in turns]

    def tokenize(self, rendered: Sequence[tuple[str, list[tuple[int, int]]]],
                 wheres: Sequence[str]) -> list[Encoded]:
        """Tokenise many renderings at once (the Rust tokenizer batches them in parallel)."""
        if not rendered:
            return []
        enc = self.tok([text for text, _ in rendered], add_special_tokens=False,
                       return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offsets, where in zip(rendered, enc["input_ids"],
                                                   enc["offset_mapping"], wheres):
            ids = np.asarray(ids, dtype=np.int32)
            starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
            ends = np.asarray([o[1] for o in offsets], dtype=np.int64)
            mask = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:  # a token not wholly before the span belongs to it (as TRL
                mask |= (ends > lo) & (starts < hi)  # splits at the first differing token)
            if not mask.any():
                raise DataError(f"{where}: no token falls inside an assistant turn")
            out.append(Encoded(ids, mask))
        return out

    def encode(self, messages: Sequence[dict], train_turns: str, where: str) -> Encoded:
        return self.tokenize([self.render(messages, train_turns, where)], [where])[0]

    def encode_pair(self, prompt: Sequence[dict], chosen: Sequence[dict],
                    rejected: Sequence[dict], where: str) -> tuple[Encoded, Encoded]:
        """Prompt + chosen and prompt + rejected, completions trained as in `render_pair`."""
        c, r = self.tokenize(list(self.render_pair(prompt, chosen, rejected, where)), [where] * 2)
        return c, r


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
