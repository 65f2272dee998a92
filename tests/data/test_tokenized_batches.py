"""Over-length rules are applied and counted; packed microbatches lay sequences out with
per-sequence labels, positions and attention blocks."""

import numpy as np
import pytest
import torch

from avr_megatron.data.batches import (block_causal_mask, collate, cu_seqlens, shared_prompt,
                                      trims_padding)
from avr_megatron.data.chat import ChatTokenizer, Encoded
from avr_megatron.data.packing import pack_best_fit_decreasing
from avr_megatron.data.records import PreferenceRecord, SFTRecord
from avr_megatron.data.tokenized import _cap_pair, tokenize_preferences, tokenize_sft

U = {"role": "user", "content": "Write a short poem about the data."}


def _sft(i, words):
    return SFTRecord(f"s{i}", (U, {"role": "assistant", "content": " ".join(["good"] * words)}),
                     f"f: line {i}")


def _pair(i, wc, wr, gap=1.0):
    return PreferenceRecord(f"p{i}", (U,), ({"role": "assistant", "content": "good " * wc},),
                            ({"role": "assistant", "content": "bad " * wr},), gap, f"f: line {i}")


def test_sft_overlong_drop_and_truncate(tokenizer):
    chat = ChatTokenizer(tokenizer)
    recs = [_sft(0, 2), _sft(1, 60), _sft(2, 3)]
    full = [len(chat.encode(r.messages, "all", "").ids) for r in recs]
    L = full[0] + 5
    dropped = tokenize_sft(recs, chat, L, "drop", "all")
    assert dropped.ids == ["s0", "s2"] and dropped.summary.dropped == {"too_long": 1}
    kept = tokenize_sft(recs, chat, L, "truncate", "all")
    assert kept.ids == ["s0", "s1", "s2"] and kept.summary.truncated == 1
    assert kept.seq_lengths.tolist() == [full[0], L, full[2]]
    # Truncating inside the prompt leaves nothing to learn: dropped and counted.
    tiny = tokenize_sft(recs, chat, 8, "truncate", "all")
    assert tiny.summary.dropped == {"no_target_after_truncation": 3} and len(tiny) == 0


def test_pair_truncation_shortens_the_longer_completion_first():
    def enc(prompt, completion):
        return Encoded(np.arange(prompt + completion, dtype=np.int32),
                       np.r_[np.zeros(prompt, bool), np.ones(completion, bool)])

    assert _cap_pair(enc(10, 5), enc(10, 40), 40) == (15, 25)  # short one whole
    assert _cap_pair(enc(10, 30), enc(10, 40), 40) == (20, 20)  # both capped equally
    assert _cap_pair(enc(20, 5), enc(19, 5), 40) is None  # prompts leave < 2 tokens


def test_preferences_packed_pairs_stay_together(tokenizer):
    chat = ChatTokenizer(tokenizer)
    recs = [_pair(i, 1 + i % 4, 2 + i % 3, gap=float(i)) for i in range(9)]
    data = tokenize_preferences(recs, chat, 256, "drop")
    assert len(data) == 9 and data.seqs_per_unit == 2
    assert data.reward_gap.tolist() == [float(i) for i in range(9)]
    plan = pack_best_fit_decreasing(data.unit_lengths, 256)
    assert plan.num_bins < 9
    batch = collate(data, plan, range(plan.num_bins), chat.pad_id)
    assert batch.num_pairs == 9 and batch.num_sequences == 18
    assert batch.seq_unit[batch.pair_chosen].tolist() == batch.seq_unit[batch.pair_rejected].tolist()
    seg = batch.segment
    for k in range(batch.num_sequences):
        row, cols = torch.nonzero(seg == k, as_tuple=True)
        assert row.unique().numel() == 1  # a sequence never spans bins
        ids, mask = data.sequence(int(data.unit_sequences(int(batch.seq_unit[k]))[0]
                                      + batch.seq_role[k]))
        r = int(row[0])
        assert batch.tokens[r, cols].tolist() == ids.tolist()
        assert batch.position_ids[r, cols].tolist() == list(range(len(ids)))
        assert batch.labels[r, cols[:-1]].tolist() == ids[1:].tolist()
        assert batch.loss_mask[r, cols].tolist() == mask[1:].tolist() + [False]
        assert batch.seq_targets[k] == mask[1:].sum()
    # chosen pairs with rejected of the same unit in the same bin
    rows = [int(torch.nonzero(seg == k)[0, 0]) for k in range(batch.num_sequences)]
    for c, r in zip(batch.pair_chosen.tolist(), batch.pair_rejected.tolist()):
        assert rows[c] == rows[r]
    assert not batch.loss_mask[seg < 0].any()
    assert batch.real_tokens() == int(plan.fill.sum())
    assert batch.reward_gap.tolist() == [float(u) for u in batch.pair_units.tolist()]
    # trim: the same micro-batch without the columns that are padding in every bin
    for bins in ([0], [0, plan.num_bins - 1], list(range(plan.num_bins))):
        full, cut = (collate(data, plan, bins, chat.pad_id, trim=t) for t in (False, True))
        width = int(plan.fill[bins].max())
        assert full.tokens.shape[1] == 256 and cut.tokens.shape == (len(bins), width)
        for name in ("tokens", "labels", "loss_mask", "position_ids", "segment"):
            assert torch.equal(getattr(cut, name), getattr(full, name)[:, :width]), name
        assert (full.segment[:, width:] == -1).all()
        assert cut.real_tokens() == full.real_tokens()


def test_shared_prompt_layout_keeps_every_label(tokenizer):
    """collate(share_prompt=True): [chosen][rejected from token n on]; every sequence's
    labels, trained bits and positions are those of its unshared layout, token for token."""
    chat = ChatTokenizer(tokenizer)
    recs = [_pair(i, 1 + i % 4, 2 + i % 3) for i in range(9)]
    data = tokenize_preferences(recs, chat, 256, "drop")
    plan = pack_best_fit_decreasing(data.unit_lengths, 256)
    bins = list(range(plan.num_bins))
    full = collate(data, plan, bins, chat.pad_id)
    both = [collate(data, plan, bins, chat.pad_id, share_prompt=True, trim=t) for t in (0, 1)]
    assert full.shared is None
    for shared in both:
        assert shared.num_sequences == full.num_sequences
        for name in ("seq_unit", "seq_role", "seq_targets", "pair_chosen", "pair_rejected"):
            assert torch.equal(getattr(shared, name), getattr(full, name)), name
        saved = 0
        for k in range(full.num_sequences):
            u, role = int(full.seq_unit[k]), int(full.seq_role[k])
            c, r = (data.sequence(s) for s in data.unit_sequences(u))
            n = shared_prompt(c, r) if role == 1 else 0
            assert role == 0 or n >= 1  # the pairs share their prompt
            rf, cf = torch.nonzero(full.segment == k, as_tuple=True)
            rs, cs = torch.nonzero(shared.segment == k, as_tuple=True)
            assert len(cs) == len(cf) - n
            saved += n
            for name in ("tokens", "labels", "loss_mask", "position_ids"):
                a, b = getattr(full, name)[rf, cf][n:], getattr(shared, name)[rs, cs]
                assert torch.equal(a, b), name
            # the labels dropped with the shared prompt are untrained
            assert not full.loss_mask[rf, cf][:n].any()
            assert (shared.shared[rs, cs] == n).all()
            if n:  # the previous sequence in the row is the chosen one, sharing n tokens
                rc, cc = torch.nonzero(shared.segment == k - 1, as_tuple=True)
                assert int(rc[0]) == int(rs[0]) and int(cc[-1]) + 1 == int(cs[0])
                assert c[0][:n + 1].tolist() == r[0][:n + 1].tolist()
                assert shared.tokens[rc, cc][:n].tolist() == r[0][:n].tolist()
        assert shared.real_tokens() == full.real_tokens() - saved
    assert both[1].tokens.shape[1] == int((both[1].segment >= 0).sum(1).max())
    assert both[0].tokens.shape[1] == 256


def test_shared_prompt_stops_where_the_rejected_trains():
    ids = np.array([5, 6, 7, 8, 9])
    untrained = np.zeros(5, bool)
    assert shared_prompt((ids, untrained), (ids.copy(), untrained)) == 4
    assert shared_prompt((ids, untrained), (np.array([5, 6, 7, 1, 2]), untrained)) == 2
    assert shared_prompt((ids, untrained), (np.array([1, 6, 7]), untrained)) == 0
    trained = np.array([0, 0, 1, 1, 1], bool)  # the rejected trains from token 2 on
    assert shared_prompt((ids, untrained), (ids.copy(), trained)) == 1
    assert shared_prompt((ids, untrained), (np.array([5, 6, 9]), np.array([0, 1, 1], bool))) == 0


def test_trims_padding_only_where_row_length_may_vary():
    assert trims_padding(use_te=False, pipeline_parallel_size=1)
    assert not trims_padding(use_te=True, pipeline_parallel_size=1)  # THD keeps whole bins
    assert not trims_padding(use_te=False, pipeline_parallel_size=2)  # fixed p2p shapes


def test_block_causal_mask_and_cu_seqlens():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2]])
    mask = block_causal_mask(seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    assert allowed[4].tolist() == [False, False, True, True, True, False]
    assert allowed[5].tolist() == [False] * 5 + [True]  # padding attends to itself only
    assert (~mask[1, 0]).equal(torch.ones(6, 6, dtype=torch.bool).tril())
    cu, longest = cu_seqlens(seg)
    assert cu.tolist() == [0, 2, 5, 6, 12] and cu.dtype == torch.int32 and longest == 6
    # two padding tails in consecutive bins stay separate sequences
    cu, _ = cu_seqlens(torch.tensor([[0, -1, -1], [-1, -1, -1]]))
    assert cu.tolist() == [0, 1, 3, 6]
