"""Preference optimisation: DPO (sigmoid), IPO, conservative DPO, an optional NLL term on the
chosen answer, and refinement-aware uses of the reward gap stored with each pair.

With policy/reference sequence log-probs pi_c, pi_r, ref_c, ref_r (sums over the trained tokens;
per-token means with loss.length_normalize) and h = (pi_c - pi_r) - (ref_c - ref_r):

    z = beta * h - m                       m = reward_gap_scale * gap   (reward_gap=margin), else 0
    sigmoid:  -(p log s(z) + (1 - p) log s(-z))
              p = 1 - label_smoothing (cDPO), or sigmoid(reward_gap_scale * gap) (soft_label)
    ipo:      (z / beta - 1 / (2 beta))^2           (= (h - 1/(2 beta))^2 without a margin)
    weight:   each pair's loss times min(gap / mean gap of the training set, weight_max)
    total:    weighted preference loss + sft_weight * (NLL of chosen / its token count)

The gap is the Bradley-Terry reward difference r(chosen) - r(rejected), i.e. a log-odds that
chosen is better: a margin in the same units as z, a target probability through the sigmoid, or
a weight that leans on pairs whose refinement gained most. Everything is per pair; the loss
function returns the sum over pairs and the pair count, and Megatron's per-token normalisation
divides by the global number of pairs, so the loss does not depend on micro-batching or layout.
Metrics follow TRL's names: rewards are beta * (policy - reference) log-ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from avr_megatron.config.schema import LossConfig
from avr_megatron.data.batches import PackedBatch
from avr_megatron.training.losses.common import SequenceLogprobs, metric, packed_forward, total


@dataclass(frozen=True)
class PairLogprobs:
    """Per-pair tensors [pairs]."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_loss(lp: PairLogprobs, reward_gap: torch.Tensor | None, cfg: LossConfig,
                    gap_mean: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss [pairs] and per-pair statistics (see the module docstring)."""
    pc, pr, rc, rr = lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected
    rc, rr = rc.to(pc.dtype), rr.to(pc.dtype)
    if cfg.length_normalize:
        nc, nr = lp.chosen_tokens.to(pc.dtype), lp.rejected_tokens.to(pc.dtype)
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    h = (pc - pr) - (rc - rr)
    gap = None if reward_gap is None else reward_gap.to(device=pc.device, dtype=pc.dtype)
    z = cfg.beta * h
    if cfg.reward_gap == "margin":
        z = z - cfg.reward_gap_scale * gap
    if cfg.type == "sigmoid":
        if cfg.reward_gap == "soft_label":
            p = torch.sigmoid(cfg.reward_gap_scale * gap)
        else:
            p = torch.full_like(z, 1.0 - cfg.label_smoothing)
        pref = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    elif cfg.type == "ipo":
        pref = (z / cfg.beta - 1.0 / (2 * cfg.beta)) ** 2
    else:
        raise ValueError(f"unknown loss.type {cfg.type!r}")
    weight = torch.ones_like(z)
    if cfg.reward_gap == "weight":
        if not gap_mean or gap_mean <= 0:
            raise ValueError("loss.reward_gap=weight needs the training set's mean reward gap")
        weight = torch.clamp(gap / gap_mean, max=cfg.reward_gap_weight_max)
    loss = weight * pref
    nll = -lp.policy_chosen / lp.chosen_tokens.to(pc.dtype).clamp_min(1)
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * nll
    chosen_reward = cfg.beta * (pc - rc).detach()
    rejected_reward = cfg.beta * (pr - rr).detach()
    stats = {
        "preference_loss": pref.detach(), "nll_chosen": nll.detach(), "weight": weight.detach(),
        "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).to(pc.dtype),
        "logps/chosen": lp.policy_chosen.detach(), "logps/rejected": lp.policy_rejected.detach(),
    }
    return loss, stats


class PreferenceObjective:
    name = "dpo"
    data_kind = "preference"
    progress_metrics = ("loss", "rewards/accuracies")

    def __init__(self, cfg: LossConfig, *, vocab_size: int, use_te: bool, bf16: bool,
                 reference, gap_mean: float | None = None):
        """reference: attaches ref_chosen / ref_rejected to batches (precomputed or online)."""
        self.cfg = cfg
        self.logprobs = SequenceLogprobs(vocab_size, cfg.logprob_chunk_size)
        self.use_te, self.bf16 = use_te, bf16
        self.reference = reference
        self.gap_mean = gap_mean

    def prepare(self, batches: list[PackedBatch]) -> None:
        self.reference.attach(batches)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = packed_forward(model, batch, use_te=self.use_te, bf16=self.bf16)
        return output, partial(self.loss, batch)

    def pair_logprobs(self, logits: torch.Tensor, batch: PackedBatch) -> PairLogprobs:
        if batch.ref_chosen is None:
            raise RuntimeError("reference log-probs were not attached to the batch")
        seq = self.logprobs.sequences(logits, batch)
        dev = seq.device
        c, r = batch.pair_chosen.to(dev), batch.pair_rejected.to(dev)
        targets = batch.seq_targets.to(dev)
        return PairLogprobs(seq[c], seq[r], batch.ref_chosen.to(dev), batch.ref_rejected.to(dev),
                            targets[c], targets[r])

    def loss(self, batch: PackedBatch, logits: torch.Tensor):
        lp = self.pair_logprobs(logits, batch)
        per_pair, stats = preference_loss(lp, batch.reward_gap, self.cfg, self.gap_mean)
        n = batch.num_pairs
        loss_sum = per_pair.sum()
        metrics = {"loss": metric(loss_sum, n), "pairs": total(n)}
        for name, values in stats.items():
            metrics[name] = metric(values.sum(), n)
        # Always reported, so every data-parallel rank reduces the same metric names: the mean
        # over the pairs that carry a gap (NaN where the data has none).
        gap = batch.reward_gap if batch.reward_gap is not None else torch.full((n,), math.nan)
        known = ~torch.isnan(gap)
        metrics["reward_gap"] = metric(torch.where(known, gap, 0.0).sum(), known.sum())
        return loss_sum, torch.tensor(n, dtype=torch.int, device=loss_sum.device), metrics
