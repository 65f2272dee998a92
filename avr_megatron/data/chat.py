"""Chat conversations -> token ids and an assistant-token mask, through the model's own chat
template.

No template layout is assumed. For an assistant turn i, the template is rendered for the
conversation up to turn i with the generation prompt (the text the model sees before it starts
answering) and for the conversation including turn i; the turn's span is the text between the two
renderings (its content plus whatever the template closes a turn with, e.g. `<|eot_id|>`, which
the model must learn to emit). Each rendering must be a prefix of the full conversation's
rendering; a template that rewrites earlier turns (e.g. strips reasoning from past turns) breaks
that, and the record is reported instead of being masked wrongly.

The full rendering is tokenised once (`add_special_tokens=False`: templates write their own BOS),
and a token is an assistant token when it starts inside an assistant span.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from avr_megatron.data.records import DataError


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

    def _prefix(self, messages: Sequence[dict], i: int, full: str, where: str) -> str:
        """The rendering that precedes assistant turn i: with the generation prompt when the
        template writes the same header inside the conversation; otherwise (templates whose
        generation prompt differs, e.g. an injected empty reasoning block) without it, so the
        turn's header tokens are trained too."""
        candidates = []
        for generation_prompt in (True, False):
            try:
                candidates.append(self._render(messages[:i], generation_prompt, where))
            except DataError:
                if i:
                    raise
        if i == 0:  # a conversation that opens with an assistant turn
            candidates.append("")
        for text in candidates:
            if full.startswith(text):
                return text
        raise DataError(
            f"{where}: the chat template renders the conversation before turn {i} differently "
            "from the same turns inside the whole conversation, so the assistant tokens cannot "
            "be located (templates that rewrite earlier turns are not supported)")

    def _span(self, messages: Sequence[dict], i: int, full: str, where: str) -> tuple[int, int]:
        """Character span of assistant turn i inside the full rendering."""
        before = self._prefix(messages, i, full, where)
        upto = full if i == len(messages) - 1 else self._render(messages[: i + 1], False, where)
        if not full.startswith(upto):
            raise DataError(
                f"{where}: the chat template renders the conversation through turn {i} "
                "differently from the same turns inside the whole conversation, so the "
                "assistant tokens cannot be located (templates that rewrite earlier turns "
                "are not supported)")
        if len(upto) <= len(before):
            raise DataError(f"{where}: assistant turn {i} renders to no text")
        return len(before), len(upto)

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
            mask = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:
                mask |= (starts >= lo) & (starts < hi)
            if not mask.any():
                raise DataError(f"{where}: no token falls inside an assistant turn")
            out.append(Encoded(ids, mask))
        return out

    def encode(self, messages: Sequence[dict], train_turns: str, where: str) -> Encoded:
        return self.tokenize([self.render(messages, train_turns, where)], [where])[0]

    def encode_completion(self, prompt: Sequence[dict], completion: Sequence[dict],
                          where: str) -> Encoded:
        """Prompt + completion with only the completion's final assistant turn trained."""
        return self.encode([*prompt, *completion], "last", where)
