"""The preference loss options against their textbook formulas, on given log-probs."""

import math

import pytest
import torch
import torch.nn.functional as F

from avr_megatron.config import load_config
from avr_megatron.training.losses.preference import PairLogprobs, preference_loss

G = torch.Generator().manual_seed(0)
PC, PR = -torch.rand(6, generator=G) * 20, -torch.rand(6, generator=G) * 20
RC, RR = -torch.rand(6, generator=G) * 20, -torch.rand(6, generator=G) * 20
NC, NR = torch.randint(1, 30, (6,), generator=G), torch.randint(1, 30, (6,), generator=G)
GAP = torch.rand(6, generator=G) * 3 + 0.1
LP = PairLogprobs(PC.double(), PR.double(), RC.double(), RR.double(), NC, NR)


def _loss(*overrides, gap_mean=None):
    cfg = load_config(None, list(overrides)).loss
    return preference_loss(LP, GAP.double(), cfg, gap_mean)


def test_dpo_cdpo_ipo():
    h = (PC - PR) - (RC - RR)
    loss, stats = _loss("loss.beta=0.2")
    torch.testing.assert_close(loss.float(), -F.logsigmoid(0.2 * h))
    loss, _ = _loss("loss.beta=0.2", "loss.label_smoothing=0.1")
    torch.testing.assert_close(loss.float(), -0.9 * F.logsigmoid(0.2 * h) - 0.1 * F.logsigmoid(-0.2 * h))
    loss, _ = _loss("loss.type=ipo", "loss.beta=0.5")
    torch.testing.assert_close(loss.float(), (h - 1.0) ** 2)
    torch.testing.assert_close(stats["rewards/chosen"].float(), 0.2 * (PC - RC))
    torch.testing.assert_close(stats["rewards/margins"].float(), 0.2 * h)
    assert stats["rewards/accuracies"].tolist() == (h > 0).double().tolist()


def test_length_normalised_and_sft_term():
    hn = (PC / NC - PR / NR) - (RC / NC - RR / NR)
    loss, stats = _loss("loss.length_normalize=true", "loss.sft_weight=0.3")
    torch.testing.assert_close(loss.float(), -F.logsigmoid(0.1 * hn) + 0.3 * (-PC / NC))
    torch.testing.assert_close(stats["nll_chosen"].float(), -PC / NC)


def test_reward_gap_options():
    h = (PC - PR) - (RC - RR)
    loss, _ = _loss("loss.reward_gap=margin", "loss.reward_gap_scale=0.5")
    torch.testing.assert_close(loss.float(), -F.logsigmoid(0.1 * h - 0.5 * GAP))
    loss, _ = _loss("loss.type=ipo", "loss.reward_gap=margin")
    torch.testing.assert_close(loss.float(), ((0.1 * h - GAP) / 0.1 - 5.0) ** 2)
    p = torch.sigmoid(2.0 * GAP)
    loss, _ = _loss("loss.reward_gap=soft_label", "loss.reward_gap_scale=2.0")
    torch.testing.assert_close(loss.float(), -p * F.logsigmoid(0.1 * h) - (1 - p) * F.logsigmoid(-0.1 * h))
    loss, stats = _loss("loss.reward_gap=weight", "loss.reward_gap_weight_max=1.5", gap_mean=1.0)
    w = torch.clamp(GAP / 1.0, max=1.5)
    torch.testing.assert_close(loss.float(), w * -F.logsigmoid(0.1 * h))
    assert stats["weight"].max().item() <= 1.5
    with pytest.raises(ValueError, match="mean reward gap"):
        _loss("loss.reward_gap=weight")


@pytest.mark.parametrize("overrides,message", [
    (["loss.type=ipo", "loss.reward_gap=soft_label"], "loss.reward_gap=soft_label needs loss.type=sigmoid"),
    (["loss.reward_gap=soft_label", "loss.label_smoothing=0.1"], "replaces loss.label_smoothing"),
    (["loss.beta=0"], "loss.beta=0.0 must be > 0"),
    (["loss.label_smoothing=0.5"], "loss.label_smoothing=0.5 must be in [0, 0.5)"),
    (["loss.reference=cached"], "loss.reference='cached' is not one of"),
    (["loss.reward_gap=scale"], "loss.reward_gap='scale' is not one of"),
    (["data.overlong=cut"], "data.overlong='cut' is not one of"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1 must be >= 0"),
    (["logps.reference.hf=a", "logps.reference.mcore=b"], "logps.reference.hf and logps.reference.mcore"),
])
def test_loss_config_rules(overrides, message):
    from avr_megatron.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
