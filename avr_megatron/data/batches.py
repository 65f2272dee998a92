"""Packed microbatches: bins laid out as fixed-length rows, a table of the sequences in them, and
the attention inputs that keep every sequence to itself.

Inside a bin, sequence i occupies tokens [start_i, start_i + len_i); the rest is padding. Labels
are next tokens within a sequence (a sequence's last token has none), and a label is trained when
the token it predicts is an assistant token. Position ids restart at 0 for each sequence.

Attention: on the local (non-TE) layer spec the model gets the [b, s] segment ids as its
attention mask, and its core attention (`avr_megatron.models.attention`) runs causal attention
within each sequence only; RoPE there rotates each token by its position id
(`avr_megatron.models.positions`). On Transformer Engine the microbatch is flattened to one row
in THD layout with cumulative sequence lengths (PackedSeqParams) from the same segment ids, and
TE restarts the rotary positions at each sequence itself.

Shared prompts (`share_prompt=True`: local spec without pipeline parallelism,
`avr_megatron.config.validate.resolve_share_prompt`):
a pair whose chosen and rejected sequences start with the same n + 1 untrained tokens (the
prompt) is laid out as [chosen] [rejected from token n on]: the rejected tail's position ids
start at n, its queries attend the chosen sequence's first n tokens plus the tail causally (the
mask carries n per token: `model_inputs`), and token n itself is kept in the tail so that it
predicts the rejected sequence's first completion token. Every label, loss-mask bit and
per-sequence sum is that of the unshared layout; the prompt is computed once instead of twice.
Bins are packed by the full pair lengths either way (the same plan, hence the same batches, for
every layer spec and layout); with trimmed micro-batches the work is the tokens laid out.
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
    # int64 [bins, L] with share_prompt: per token, how many leading tokens of the previous
    # sequence in the bin its sequence also attends (a rejected tail: the shared prompt); None
    # when no sequence of the batch shares one.
    shared: torch.Tensor | None = None

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
        """Tokens computed (a shared prompt counts once)."""
        return int((self.segment >= 0).sum())


def trims_padding(use_te: bool, pipeline_parallel_size: int) -> bool:
    """Whether micro-batches drop their all-padding tail columns (`collate(..., trim=True)`):
    on the local spec every sequence attends only to itself, so a shorter row changes nothing
    but the work, and without pipeline parallelism no stage expects a fixed activation shape.
    The Transformer Engine (THD) path keeps whole bins."""
    return not use_te and pipeline_parallel_size == 1


def shared_prompt(chosen: tuple[np.ndarray, np.ndarray],
                  rejected: tuple[np.ndarray, np.ndarray]) -> int:
    """How many leading tokens of a pair the rejected sequence can take from the chosen one:
    n = p - 1 for the longest common prefix p of the two token sequences, cut where the
    rejected sequence starts training (a label in the prefix must stay in its own sequence);
    0 when there is nothing to share. (Token n itself stays in the rejected tail: it predicts
    the first token the two differ in.)"""
    (ids_c, _), (ids_r, mask_r) = chosen, rejected
    m = min(len(ids_c), len(ids_r))
    differ = np.flatnonzero(ids_c[:m] != ids_r[:m])
    p = int(differ[0]) if len(differ) else m
    trained = np.flatnonzero(mask_r[1:p])  # labels of tokens 0..p-2 predict tokens 1..p-1
    if len(trained):
        p = int(trained[0]) + 1
    return max(p - 1, 0)


def collate(data: TokenizedDataset, plan: PackingPlan, bins: Sequence[int],
            pad_id: int, *, trim: bool = False, share_prompt: bool = False) -> PackedBatch:
    """The bins as one micro-batch of [len(bins), L] rows: L = the bin capacity, or with `trim`
    the fullest bin's fill (padding that only fills bins up to capacity is never computed). A
    negative bin index is an all-padding row holding no sequence. `share_prompt`: each pair's
    shared prompt is laid out once (module docstring); only the local spec's attention takes it
    (`avr_megatron.config.validate.resolve_share_prompt`; `TrainingData.share_prompt`). The
    packing plan is the same either way (bins just hold fewer tokens when shared), so the
    batches of a step do not depend on the layer spec or layout."""
    L = plan.capacity
    n = len(bins)
    tokens = np.full((n, L), pad_id, dtype=np.int64)
    labels = np.zeros((n, L), dtype=np.int64)
    loss_mask = np.zeros((n, L), dtype=bool)
    positions = np.zeros((n, L), dtype=np.int64)
    segment = np.full((n, L), -1, dtype=np.int64)
    shared = np.zeros((n, L), dtype=np.int64) if share_prompt else None
    seq_unit, seq_role, seq_targets = [], [], []
    pair_c, pair_r = [], []
    width = 0  # the fullest row's fill
    pairs = data.seqs_per_unit == 2
    for row, b in enumerate(bins):
        offset = 0
        if b < 0:
            continue  # an empty row (evaluation fills its last microbatch with them)
        for u in plan.bin(int(b)):
            seqs = [data.sequence(s) for s in data.unit_sequences(int(u))]
            skip = shared_prompt(*seqs) if share_prompt and pairs else 0
            for role, (ids, mask) in enumerate(seqs):
                first = skip if role == REJECTED else 0
                k, end = len(ids), offset + len(ids) - first
                index = len(seq_unit)
                tokens[row, offset:end] = ids[first:]
                labels[row, offset:end - 1] = ids[first + 1:]
                loss_mask[row, offset:end - 1] = mask[first + 1:]
                positions[row, offset:end] = np.arange(first, k)
                segment[row, offset:end] = index
                if first:
                    shared[row, offset:end] = first
                seq_unit.append(int(u))
                seq_role.append(role)
                seq_targets.append(int(mask[1:].sum()))
                if pairs:
                    (pair_c if role == CHOSEN else pair_r).append(index)
                offset = end
        assert offset <= L, "packing plan overfills a bin"
        width = max(width, offset)
    if trim and 0 < width < L:
        tokens, labels, loss_mask, positions, segment = (
            a[:, :width] for a in (tokens, labels, loss_mask, positions, segment))
        shared = None if shared is None else shared[:, :width]
    batch = PackedBatch(
        tokens=torch.from_numpy(np.ascontiguousarray(tokens)),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        loss_mask=torch.from_numpy(np.ascontiguousarray(loss_mask)),
        position_ids=torch.from_numpy(np.ascontiguousarray(positions)),
        segment=torch.from_numpy(np.ascontiguousarray(segment)),
        seq_unit=torch.tensor(seq_unit, dtype=torch.int64),
        seq_role=torch.tensor(seq_role, dtype=torch.int64),
        seq_targets=torch.tensor(seq_targets, dtype=torch.int64))
    if shared is not None and shared.any():
        batch.shared = torch.from_numpy(np.ascontiguousarray(shared))
    if pairs:
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
        mask = batch.segment if batch.shared is None else torch.stack([batch.segment,
                                                                        batch.shared], 1)
        if device is not None:
            mask = mask.to(device)
        return {"input_ids": tokens, "position_ids": positions, "attention_mask": mask}
    if batch.shared is not None:
        raise ValueError("a batch with shared prompts needs the local spec's attention "
                         "(Transformer Engine's THD attention cannot express them)")
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens(batch.segment)
    if device is not None:
        cu = cu.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return {"input_ids": tokens.reshape(1, -1), "position_ids": positions.reshape(1, -1),
            "attention_mask": None, "packed_seq_params": params}
