"""Packed microbatches: bins laid out as fixed-length rows, a table of the sequences in them, and
the attention inputs that keep every sequence to itself.

Inside a bin, sequence i occupies tokens [start_i, start_i + len_i); the rest is padding. Labels
are next tokens within a sequence (a sequence's last token has none), and a label is trained when
the token it predicts is an assistant token. Position ids restart at 0 for each sequence.

Attention: on the local (non-TE) layer spec the model gets the [b, s] segment ids as its
attention mask, and its core attention (`avr_megatron.models.attention`) runs causal attention
within each sequence only. RoPE in Megatron's GPTModel ignores position ids and rotates by the
position within the row; attention scores depend only on the distance between query and key,
which is the same within a sequence wherever it sits in the bin, so attention confined to each
sequence reproduces unpacked attention. On Transformer Engine the microbatch is flattened to one
row in THD layout with cumulative sequence lengths (PackedSeqParams) from the same segment ids,
and TE restarts the rotary positions at each sequence itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from avr_megatron.data.packing import PackingPlan
from avr_megatron.data.tokenized import TokenizedDataset
from avr_megatron.models.packed import cu_seqlens  # noqa: F401  (re-exported)

CHOSEN, REJECTED = 0, 1  # sequence roles inside a preference unit (SFT sequences are role 0)


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # int64 [bins, L]
    labels: torch.Tensor  # int64 [bins, L]
    loss_mask: torch.Tensor  # bool [bins, L]: label is a trained (assistant) token
    position_ids: torch.Tensor  # int64 [bins, L], restart at 0 per sequence
    segment: torch.Tensor  # int64 [bins, L]: sequence index in this batch, -1 for padding
    # Sequence table, one entry per sequence in the batch.
    seq_unit: torch.Tensor  # int64: unit (example) index in the dataset
    seq_role: torch.Tensor  # int64: CHOSEN / REJECTED (0 for SFT)
    seq_targets: torch.Tensor  # int64: trained labels per sequence
    # Preference units: indices into the sequence table, and the pair's data.
    pair_chosen: torch.Tensor | None = None
    pair_rejected: torch.Tensor | None = None
    reward_gap: torch.Tensor | None = None  # float64 (nan where the data has none)
    # Reference log-probs per pair (sum over trained tokens), attached before the step.
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.seq_unit.numel())

    @property
    def num_pairs(self) -> int:
        return 0 if self.pair_chosen is None else int(self.pair_chosen.numel())

    @property
    def pair_units(self) -> torch.Tensor:
        return self.seq_unit[self.pair_chosen]

    def real_tokens(self) -> int:
        return int((self.segment >= 0).sum())


def trims_padding(use_te: bool, pipeline_parallel_size: int) -> bool:
    """Whether micro-batches drop their all-padding tail columns (`collate(..., trim=True)`):
    on the local spec every sequence attends only to itself, so a shorter row changes nothing
    but the work, and without pipeline parallelism no stage expects a fixed activation shape.
    The Transformer Engine (THD) path keeps whole bins."""
    return not use_te and pipeline_parallel_size == 1


def collate(data: TokenizedDataset, plan: PackingPlan, bins: Sequence[int],
            pad_id: int, *, trim: bool = False) -> PackedBatch:
    """The bins as one micro-batch of [len(bins), L] rows: L = the bin capacity, or with `trim`
    the fullest bin's fill (padding that only fills bins up to capacity is never computed). A
    negative bin index is an all-padding row holding no sequence."""
    L = plan.capacity
    real = np.asarray(bins, dtype=np.int64)
    real = real[real >= 0]
    if trim and len(real):
        L = max(1, int(np.max(plan.fill[real])))
    n = len(bins)
    tokens = np.full((n, L), pad_id, dtype=np.int64)
    labels = np.zeros((n, L), dtype=np.int64)
    loss_mask = np.zeros((n, L), dtype=bool)
    positions = np.zeros((n, L), dtype=np.int64)
    segment = np.full((n, L), -1, dtype=np.int64)
    seq_unit, seq_role, seq_targets = [], [], []
    pair_c, pair_r = [], []
    for row, b in enumerate(bins):
        offset = 0
        if b < 0:
            continue  # an empty row (evaluation fills its last microbatch with them)
        for u in plan.bin(int(b)):
            for role, s in enumerate(data.unit_sequences(int(u))):
                ids, mask = data.sequence(s)
                k, end = len(ids), offset + len(ids)
                index = len(seq_unit)
                tokens[row, offset:end] = ids
                labels[row, offset:end - 1] = ids[1:]
                loss_mask[row, offset:end - 1] = mask[1:]
                positions[row, offset:end] = np.arange(k)
                segment[row, offset:end] = index
                seq_unit.append(int(u))
                seq_role.append(role)
                seq_targets.append(int(mask[1:].sum()))
                if data.seqs_per_unit == 2:
                    (pair_c if role == CHOSEN else pair_r).append(index)
                offset = end
        assert offset <= L, "packing plan overfills a bin"
    batch = PackedBatch(
        tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask), position_ids=torch.from_numpy(positions),
        segment=torch.from_numpy(segment),
        seq_unit=torch.tensor(seq_unit, dtype=torch.int64),
        seq_role=torch.tensor(seq_role, dtype=torch.int64),
        seq_targets=torch.tensor(seq_targets, dtype=torch.int64))
    if data.seqs_per_unit == 2:
        batch.pair_chosen = torch.tensor(pair_c, dtype=torch.int64)
        batch.pair_rejected = torch.tensor(pair_r, dtype=torch.int64)
        gaps = data.reward_gap[batch.seq_unit[batch.pair_chosen].numpy()]
        batch.reward_gap = torch.from_numpy(np.ascontiguousarray(gaps))
    return batch


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True where attention is masked out (what
    Megatron's own unfused local attention needs; the reference in tests and benchmarks). Padding
    (segment -1) forms one more block so no row is fully masked."""
    s = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment.device).tril_()
    return ~(same & causal).unsqueeze(1)


def model_inputs(batch: PackedBatch, use_te: bool, device=None) -> dict:
    """Keyword arguments for GPTModel.forward (input_ids, position_ids, attention_mask,
    packed_seq_params) for this batch on the local or the Transformer Engine spec."""
    tokens, positions = batch.tokens, batch.position_ids
    if device is not None:
        tokens, positions = tokens.to(device), positions.to(device)
    if not use_te:
        segment = batch.segment if device is None else batch.segment.to(device)
        return {"input_ids": tokens, "position_ids": positions, "attention_mask": segment}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens(batch.segment)
    if device is not None:
        cu = cu.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return {"input_ids": tokens.reshape(1, -1), "position_ids": positions.reshape(1, -1),
            "attention_mask": None, "packed_seq_params": params}
