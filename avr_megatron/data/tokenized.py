"""Records -> a tokenised dataset of packing units, with the over-length rule applied and
counted.

A unit is what packing must keep whole: one SFT conversation, or one preference pair (chosen and
rejected sequences, each the prompt followed by that completion). Token ids and masks live in
flat arrays (no per-example Python objects), so a large dataset stays compact on every rank.

Over-length units (longer than one bin, `seq_length`; a pair needs chosen + rejected to fit one
bin) are dropped or truncated by `data.overlong` and counted by reason in `DataSummary`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from avr_megatron.data.chat import ChatTokenizer, Encoded
from avr_megatron.data.records import DataError, PreferenceRecord, SFTRecord

_BATCH = 512  # records rendered and tokenised together


@dataclass
class DataSummary:
    kind: str
    records: int = 0
    used: int = 0
    # reason -> count: too_long (overlong=drop), prompt_too_long (no room left for completions
    # after truncation), no_target_after_truncation (SFT: the kept part has no assistant token).
    dropped: dict[str, int] = field(default_factory=dict)
    # name -> count of records read in a way worth saying (see tokenize_preferences' _NOTES).
    notes: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    sequences: int = 0
    tokens: int = 0
    # Tokens whose next-token prediction is trained (assistant tokens after the first).
    target_tokens: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def note(self, name: str) -> None:
        self.notes[name] = self.notes.get(name, 0) + 1

    def as_dict(self) -> dict:
        return asdict(self)


def _cap_pair(chosen: Encoded, rejected: Encoded, capacity: int) -> tuple[int, int] | None:
    """Lengths to keep of (chosen, rejected) so both fit one bin, shortening the longer
    completion first; None when the prompts alone leave no room (at least one completion token
    each)."""
    pc, pr = int(chosen.mask.argmax()), int(rejected.mask.argmax())  # prompt token counts
    c, r = len(chosen.ids) - pc, len(rejected.ids) - pr
    budget = capacity - pc - pr
    if budget < 2:
        return None
    if 2 * min(c, r) >= budget:
        kc = kr = budget // 2
    else:
        kc, kr = (c, budget - c) if c <= r else (budget - r, r)
    return pc + min(c, kc), pr + min(r, kr)


class TokenizedDataset:
    """Units of 1 (SFT) or 2 (chosen, rejected) sequences, in record order.

    The arrays may be in memory (tokenised in this process) or memory-mapped from prepared
    files (`avr_megatron.data.prepared`): nothing here reads more of them than a caller asks
    for. Prepared data also brings what it computed once (per-unit example hashes, the data
    fingerprint, the largest token id), so those are not recomputed from every token."""

    def __init__(self, kind: str, ids: Sequence[str], seq_offsets: np.ndarray,
                 tokens: np.ndarray, mask: np.ndarray, reward_gap: np.ndarray | None,
                 summary: DataSummary, *, wheres: Callable[[int], str] | Sequence[str],
                 example_hashes: Sequence[str] | None = None, fingerprint: str | None = None,
                 max_token: int | None = None):
        self.kind = kind
        self.seqs_per_unit = 1 if kind == "sft" else 2
        assert len(seq_offsets) == len(ids) * self.seqs_per_unit + 1
        self.ids = ids
        self.seq_offsets, self.tokens, self.mask = seq_offsets, tokens, mask
        self.reward_gap = reward_gap
        self.summary = summary
        self._wheres = wheres
        self._example_hashes = example_hashes
        self._fingerprint = fingerprint
        self._max_token = max_token

    @classmethod
    def from_encoded(cls, kind: str, ids: list[str], seqs: list[Encoded],
                     reward_gap: Sequence[float | None] | None, summary: DataSummary,
                     wheres: list[str]) -> "TokenizedDataset":
        lengths = np.asarray([len(s.ids) for s in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = (np.concatenate([s.ids for s in seqs]) if seqs
                  else np.zeros(0, np.int32)).astype(np.int32)
        mask = np.concatenate([s.mask for s in seqs]) if seqs else np.zeros(0, bool)
        gaps = np.asarray([math.nan if g is None else g for g in reward_gap],
                          dtype=np.float64) if reward_gap is not None else None
        return cls(kind, ids, offsets, tokens, mask, gaps, summary, wheres=wheres)

    def __len__(self) -> int:
        return len(self.ids)

    def where(self, u: int) -> str:
        """The record unit u came from ("file: line N (id ...)"), for error messages."""
        w = self._wheres
        return w(u) if callable(w) else w[u]

    def sequence(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.seq_offsets[s], self.seq_offsets[s + 1]
        return self.tokens[lo:hi], self.mask[lo:hi]

    def sequence_targets(self, s: int) -> int:
        """Trained labels of sequence s (assistant tokens after its first token)."""
        return int(self.sequence(s)[1][1:].sum())

    def unit_sequences(self, u: int) -> range:
        return range(u * self.seqs_per_unit, (u + 1) * self.seqs_per_unit)

    @property
    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    @property
    def unit_lengths(self) -> np.ndarray:
        return self.seq_lengths.reshape(-1, self.seqs_per_unit).sum(1)

    def example_hash(self, u: int) -> str:
        """Identifies exactly what a unit's log-probs are computed over: token ids and masks."""
        if self._example_hashes is not None:
            return self._example_hashes[u]
        return compute_example_hash(self, u)

    def fingerprint(self) -> str:
        """Hash of every unit's id and content, in order: the exact training data."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for u, rid in enumerate(self.ids):
                h.update(rid.encode())
                h.update(self.example_hash(u).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def check_vocab(self, vocab_size: int, source: str) -> None:
        if not len(self.tokens):
            return
        largest = self._max_token if self._max_token is not None else int(self.tokens.max())
        if largest >= vocab_size:
            bad = int(np.argmax(self.tokens >= vocab_size))
            seq = int(np.searchsorted(self.seq_offsets, bad, side="right") - 1)
            raise DataError(
                f"token id {int(self.tokens[bad])} of example {self.ids[seq // self.seqs_per_unit]!r}"
                f" ({source}) is >= model.vocab_size={vocab_size}: the tokenizer does not fit "
                "the model")


def compute_example_hash(data: TokenizedDataset, u: int) -> str:
    h = hashlib.sha256()
    for s in data.unit_sequences(u):
        ids, mask = data.sequence(s)
        h.update(np.int64(len(ids)).tobytes())
        h.update(ids.astype(np.int32).tobytes())
        h.update(np.packbits(mask).tobytes())
    return h.hexdigest()[:16]


def tokenize_sft(records: Sequence[SFTRecord], chat: ChatTokenizer, seq_length: int,
                 overlong: str, loss_on: str) -> TokenizedDataset:
    summary = DataSummary("sft", records=len(records))
    ids, seqs, wheres = [], [], []
    for start in range(0, len(records), _BATCH):
        batch = records[start:start + _BATCH]
        encoded = chat.tokenize([chat.render(r.messages, loss_on, r.where) for r in batch],
                                [r.where for r in batch])
        for rec, enc in zip(batch, encoded):
            if len(enc.ids) > seq_length:
                if overlong == "drop":
                    summary.drop("too_long")
                    continue
                enc = Encoded(enc.ids[:seq_length], enc.mask[:seq_length])
                if not enc.mask[1:].any():
                    summary.drop("no_target_after_truncation")
                    continue
                summary.truncated += 1
            if not enc.mask[1:].any():  # only the very first token is an assistant token
                summary.drop("no_target_after_truncation")
                continue
            ids.append(rec.id)
            wheres.append(rec.where)
            seqs.append(enc)
            summary.tokens += len(enc.ids)
            summary.target_tokens += int(enc.mask[1:].sum())
    summary.used, summary.sequences = len(ids), len(seqs)
    return TokenizedDataset.from_encoded("sft", ids, seqs, None, summary, wheres)


def tokenize_preferences(records: Sequence[PreferenceRecord], chat: ChatTokenizer,
                         seq_length: int, overlong: str) -> TokenizedDataset:
    summary = DataSummary("preference", records=len(records))
    ids, seqs, gaps, wheres = [], [], [], []
    for start in range(0, len(records), _BATCH):
        batch = records[start:start + _BATCH]
        rendered, batch_wheres = [], []
        for r in batch:
            info: dict = {}
            rendered += chat.render_pair(r.prompt, r.chosen, r.rejected, r.where, info)
            batch_wheres += [r.where, r.where]
            if len(r.chosen) > 1 or len(r.rejected) > 1:
                summary.note("multi_message_completions")
            if not info["generation_prompt_fits"]:
                summary.note("generation_prompt_not_in_conversation")
        encoded = chat.tokenize(rendered, batch_wheres)
        for k, rec in enumerate(batch):
            chosen, rejected = encoded[2 * k], encoded[2 * k + 1]
            if len(chosen.ids) + len(rejected.ids) > seq_length:
                if overlong == "drop":
                    summary.drop("too_long")
                    continue
                keep = _cap_pair(chosen, rejected, seq_length)
                if keep is None:
                    summary.drop("prompt_too_long")
                    continue
                chosen = Encoded(chosen.ids[:keep[0]], chosen.mask[:keep[0]])
                rejected = Encoded(rejected.ids[:keep[1]], rejected.mask[:keep[1]])
                summary.truncated += 1
            ids.append(rec.id)
            wheres.append(rec.where)
            seqs += [chosen, rejected]
            gaps.append(rec.reward_gap)
            for s in (chosen, rejected):
                summary.tokens += len(s.ids)
                summary.target_tokens += int(s.mask[1:].sum())
    summary.used, summary.sequences = len(ids), len(seqs)
    _warn_about_notes(summary)
    return TokenizedDataset.from_encoded("preference", ids, seqs, gaps, summary, wheres)


_NOTES = {
    "multi_message_completions": "have a chosen or rejected of several messages: as in TRL's "
    "DPOTrainer, every token after the prompt is trained and scored, the turns in between "
    "included",
    "generation_prompt_not_in_conversation": "are rendered by a chat template whose generation "
    "prompt adds text the conversation does not contain: as in TRL's DPOTrainer, the completion "
    "starts where the two renderings part (after the assistant header), so that text is in "
    "neither",
}


def _warn_about_notes(summary: DataSummary) -> None:
    import logging

    for name, count in summary.notes.items():
        logging.getLogger(__name__).warning("%d of %d preference records %s", count,
                                            summary.records, _NOTES[name])


def require_reward_gaps(data: TokenizedDataset, mode: str) -> None:
    """loss.reward_gap needs a positive gap on every pair used; name the first offender."""
    gaps = np.asarray(data.reward_gap)
    bad = np.isnan(gaps)
    if mode in ("margin", "weight"):
        bad |= gaps <= 0
    if not bad.any():
        return
    u = int(np.argmax(bad))
    if math.isnan(gaps[u]):
        raise DataError(f"{data.where(u)}: loss.reward_gap={mode} needs a reward gap, but the "
                        "record has neither reward_gap nor reward_chosen + reward_rejected")
    raise DataError(f"{data.where(u)}: field 'reward_gap': loss.reward_gap={mode} needs chosen "
                    f"to outscore rejected (gap > 0), got {gaps[u]}")
