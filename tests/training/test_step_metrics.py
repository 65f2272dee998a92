"""How reported metrics become a step's numbers: means over observations, totals, and a mean
over no observations (NaN, not 0). Also the loss function of the preference objective always
reports the same metric names."""

import math

import torch

from avr_megatron.training import schedule
from avr_megatron.training.losses.common import metric, total


def _single_rank(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_group", lambda *a, **k: None)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(schedule.dist, "get_world_size", lambda group=None: 1)


def test_reduce_means_totals_and_empty_means(monkeypatch):
    _single_rank(monkeypatch)
    reported = [{"loss": metric(torch.tensor(3.0), 2), "pairs": total(2),
                 "reward_gap": metric(0.0, 0), "lr_like": torch.tensor(1.0)},
                {"loss": metric(torch.tensor(1.0), 2), "pairs": total(2),
                 "reward_gap": metric(0.0, 0), "lr_like": torch.tensor(3.0)}]
    out = schedule.reduce_metrics(reported)
    assert out["loss"] == 1.0 and out["pairs"] == 4.0 and out["lr_like"] == 2.0
    assert math.isnan(out["reward_gap"])


def test_preference_loss_reports_reward_gap_for_every_batch():
    """With or without gaps (NaN where a pair has none), the same names, so data-parallel ranks
    all-reduce the same metrics; the gap is the mean over the pairs that have one."""
    from avr_megatron.config import load_config
    from avr_megatron.data.batches import PackedBatch
    from avr_megatron.training.losses.preference import PreferenceObjective

    cfg = load_config(None, [])

    class _Ref:
        def attach(self, batches):
            pass

    objective = PreferenceObjective(cfg.loss, vocab_size=8, use_te=False, bf16=False,
                                    reference=_Ref())

    def batch(gaps):
        n = len(gaps)
        seqs = 2 * n
        labels = torch.zeros(1, 4 * seqs, dtype=torch.long)
        return PackedBatch(
            tokens=labels.clone(), labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.bool),
            position_ids=labels.clone(),
            segment=torch.arange(seqs).repeat_interleave(4).unsqueeze(0),
            seq_unit=torch.arange(seqs) // 2, seq_role=torch.arange(seqs) % 2,
            seq_targets=torch.full((seqs,), 4), pair_chosen=torch.arange(0, seqs, 2),
            pair_rejected=torch.arange(1, seqs, 2),
            reward_gap=torch.tensor(gaps, dtype=torch.float64),
            ref_chosen=torch.zeros(n, dtype=torch.float64),
            ref_rejected=torch.zeros(n, dtype=torch.float64))

    names = []
    for gaps in ([1.0, 3.0], [math.nan, 2.0], [math.nan, math.nan]):
        b = batch(gaps)
        logits = torch.randn(1, b.tokens.shape[1], 8)
        _, _, metrics = objective.loss(b, logits)
        names.append(sorted(metrics))
        s, c = metrics["reward_gap"].tolist()
        known = [g for g in gaps if not math.isnan(g)]
        assert (s, c) == (sum(known), len(known))
    assert names[0] == names[1] == names[2]
