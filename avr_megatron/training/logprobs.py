"""Token and sequence log-probabilities from vocab-parallel logits.

Each tensor-parallel rank holds logits for its slice of the (padded) vocabulary. The log-prob of
a label is `logit[label] - logsumexp(all real logits)`; the logsumexp is assembled from per-rank
partial maxima and sums of exponentials (one MAX and one SUM all-reduce of a few floats per
token), so the full vocabulary is never gathered on one rank.

Memory: only the rows whose label is trained are computed, in chunks of `chunk_size` rows, so
fp32 temporaries are bounded by chunk_size x vocab/TP instead of seq x vocab (a full fp32
log_softmax at vocab 128k and 8k tokens is 4 GB, plus as much again for its gradient). The
backward pass recomputes the softmax chunk by chunk from the saved logits and one logsumexp per
row, and writes the gradient in the logits' dtype. Padded vocabulary columns (beyond the
tokenizer's vocabulary) are excluded from the normaliser and get zero gradient.
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


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, targets, vocab_size, chunk_size):
        group, tp, rank = _tp()
        local_vocab = logits.shape[1]
        start = rank * local_vocab
        valid = max(0, min(local_vocab, vocab_size - start))  # real-token columns held here
        n = rows.numel()
        dev = logits.device
        local_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
        sum_exp = torch.zeros(n, dtype=torch.float32, device=dev)
        target_logit = torch.zeros(n, dtype=torch.float32, device=dev)
        local_target = targets - start
        in_range = (local_target >= 0) & (local_target < valid)
        if valid:
            for lo in range(0, n, chunk_size):
                hi = min(n, lo + chunk_size)
                x = logits.index_select(0, rows[lo:hi])[:, :valid].float()
                m = x.max(dim=1).values
                local_max[lo:hi] = m
                sum_exp[lo:hi] = torch.exp(x - m[:, None]).sum(dim=1)
                t = local_target[lo:hi].clamp(0, valid - 1)
                picked = x.gather(1, t[:, None]).squeeze(1)
                target_logit[lo:hi] = torch.where(in_range[lo:hi], picked, 0.0)
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
        ctx.valid, ctx.chunk_size = valid, chunk_size
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, local_target, in_range, lse = ctx.saved_tensors
        valid, chunk_size = ctx.valid, ctx.chunk_size
        grad = torch.zeros_like(logits)
        if valid:
            real = grad[:, :valid]
            n = rows.numel()
            grad_out = grad_out.float()
            for lo in range(0, n, chunk_size):
                hi = min(n, lo + chunk_size)
                x = logits.index_select(0, rows[lo:hi])[:, :valid].float()
                g = torch.exp(x - lse[lo:hi, None]).mul_(-grad_out[lo:hi, None])
                hit = in_range[lo:hi]
                idx = torch.nonzero(hit).squeeze(1)
                g[idx, local_target[lo:hi][idx]] += grad_out[lo:hi][idx]
                real.index_copy_(0, rows[lo:hi], g.to(grad.dtype))
                del x, g
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   vocab_size: int, chunk_size: int = 1024) -> torch.Tensor:
    """log p(label) at every position where `mask` is set, 0 elsewhere.

    logits: [..., vocab/TP] this rank's vocabulary slice (any float dtype); labels, mask: the
    leading shape. vocab_size: the real (unpadded) vocabulary. Returns float32, leading shape.
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
