"""Token and sequence log-probabilities from vocab-parallel logits.

Each tensor-parallel rank holds logits for its slice of the (padded) vocabulary. The log-prob of
a label is `logit[label] - logsumexp(all real logits)`; the logsumexp is assembled from per-rank
partial maxima and sums of exponentials (one MAX and one SUM all-reduce of a few floats per
token), so the full vocabulary is never gathered on one rank.

Memory: only the rows whose label is trained are computed, in chunks of rows (by default about
16M logits, 64 MiB of fp32, per chunk), so fp32 temporaries are bounded by the chunk instead of
seq x vocab (a full fp32 log_softmax at vocab 128k and 8k tokens is 4 GiB, and its backward as
much again). The backward pass recomputes the softmax chunk by chunk, in place, from the saved
logits and one logsumexp per row, and writes the gradient in the logits' dtype. Padded
vocabulary columns (beyond the tokenizer's vocabulary) are excluded from the normaliser and get
zero gradient.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _tp():
    """(group, size, rank) of the tensor-parallel group; (None, 1, 0) outside Megatron (parallel
    state is looked up without importing Megatron: plain uses need not pay for it)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


AUTO_CHUNK_LOGITS = 1 << 24  # chunk_size=0: ~16M logits (64 MiB of fp32) per chunk


def _chunk_rows(chunk_size: int, local_vocab: int) -> int:
    return chunk_size if chunk_size > 0 else max(16, AUTO_CHUNK_LOGITS // max(local_vocab, 1))


def _rows_fp32(logits: torch.Tensor, rows: torch.Tensor, valid: int) -> torch.Tensor:
    """A fresh fp32 copy of the selected rows' real-token columns (safe to modify in place).
    Contiguous row ranges (common: trained tokens come in runs) are read without a gather."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == rows.numel():
        return logits[lo:hi, :valid].to(torch.float32, copy=True)
    picked = logits.index_select(0, rows)[:, :valid]
    return picked if picked.dtype == torch.float32 else picked.float()


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, targets, vocab_size, chunk_size):
        group, tp, rank = _tp()
        local_vocab = logits.shape[1]
        start = rank * local_vocab
        valid = max(0, min(local_vocab, vocab_size - start))  # real-token columns held here
        n = rows.numel()
        step = _chunk_rows(chunk_size, local_vocab)
        dev = logits.device
        local_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        sum_exp = torch.zeros(n, dtype=torch.float32, device=dev)
        target_logit = torch.zeros(n, dtype=torch.float32, device=dev)
        local_target = targets - start
        in_range = (local_target >= 0) & (local_target < valid)
        if valid:
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                x = _rows_fp32(logits, rows[lo:hi], valid)
                t = local_target[lo:hi].clamp(0, valid - 1)
                picked = x.gather(1, t[:, None]).squeeze(1)
                target_logit[lo:hi] = torch.where(in_range[lo:hi], picked, 0.0)
                m = x.amax(dim=1)
                local_max[lo:hi] = m
                sum_exp[lo:hi] = x.sub_(m[:, None]).exp_().sum(dim=1)
                del x
        global_max = local_max
        if tp > 1:
            global_max = local_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            # rescale this rank's partial sum to the global maximum before summing
            sum_exp = sum_exp * torch.exp(local_max - global_max)
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_logit = both[0], both[1]
        lse = global_max + torch.log(sum_exp)
        ctx.save_for_backward(logits, rows, local_target, in_range, lse)
        ctx.valid, ctx.step = valid, step
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, local_target, in_range, lse = ctx.saved_tensors
        valid, step = ctx.valid, ctx.step
        grad = torch.zeros_like(logits)
        if valid:
            real = grad[:, :valid]
            n = rows.numel()
            grad_out = grad_out.float()
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                r = rows[lo:hi]
                # d logp / d logit_j = 1[j = label] - softmax_j, recomputed from the logits
                g = _rows_fp32(logits, r, valid)
                g.sub_(lse[lo:hi, None]).exp_().mul_(-grad_out[lo:hi, None])
                idx = torch.nonzero(in_range[lo:hi]).squeeze(1)
                g[idx, local_target[lo:hi][idx]] += grad_out[lo:hi][idx]
                first, last = int(r[0]), int(r[-1]) + 1
                if last - first == r.numel():
                    real[first:last].copy_(g)
                else:
                    real.index_copy_(0, r, g.to(grad.dtype))
                del g
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int, chunk_size: int = 0) -> torch.Tensor:
    """log p(label) at every position where `mask` is set, 0 elsewhere.

    logits: [..., vocab/TP] this rank's vocabulary slice (any float dtype); labels, mask: the
    leading shape. vocab_size: the real (unpadded) vocabulary. chunk_size: rows per chunk, 0 for
    about 16M logits per chunk. Returns float32 with the leading shape.
    """
    local_vocab = logits.shape[-1]
    flat = logits.reshape(-1, local_vocab)
    labels = labels.reshape(-1)
    rows = torch.nonzero(mask.reshape(-1)).squeeze(1)
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=logits.device)
    if rows.numel():
        picked = _VocabParallelLogProb.apply(flat, rows, labels.index_select(0, rows),
                                             int(vocab_size), int(chunk_size))
        out = out.index_put((rows,), picked)
    return out.reshape(mask.shape)


def sequence_sums(per_token: torch.Tensor, segment: torch.Tensor,
                  num_sequences: int) -> torch.Tensor:
    """Sum a per-token quantity over each sequence (segment id >= 0) -> [num_sequences]."""
    flat, seg = per_token.reshape(-1), segment.reshape(-1)
    keep = seg >= 0
    out = torch.zeros(num_sequences, dtype=per_token.dtype, device=per_token.device)
    return out.index_add(0, seg[keep], flat[keep])
