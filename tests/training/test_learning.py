"""The stages learn: SFT drives the loss down; DPO from the SFT checkpoint (online reference)
learns a simple preference rule (chosen answers use "positive" words) to a reward accuracy above
0.95 on training batches and on held-out pairs; non-finite steps are skipped, and too many in a
row abort."""

import math

import pytest

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

COMMON = ["model.preset=tiny", "train.seq_length=128", "train.micro_batch_size=2",
          "train.global_batch_size=8", "logging.progress_bar=false", "logging.tensorboard=false",
          "scheduler.warmup_iters=5"]


class _NaNAt:
    """Wraps an objective: the loss is NaN at the given (1-based) iterations."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.calls = inner, set(bad), 0
        self.name, self.data_kind = inner.name, inner.data_kind
        self.progress_metrics = inner.progress_metrics

    def prepare(self, batches):
        self.calls += 1
        self.inner.prepare(batches)

    def forward_step(self, data_iterator, model):
        output, loss_func = self.inner.forward_step(data_iterator, model)
        poison = self.calls in self.bad

        def wrapped(out):
            loss, count, metrics = loss_func(out)
            return (loss * math.nan if poison else loss), count, metrics

        return output, wrapped


def _case(tmp):
    from pathlib import Path

    import numpy as np
    import torch

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import collate
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.models.llama import uses_transformer_engine
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, sft_records, write_jsonl
    from avr_megatron.training.loop import Trainer, TrainingAborted
    from avr_megatron.training.losses.common import SequenceLogprobs
    from avr_megatron.training.losses.sft import SFTObjective
    from avr_megatron.training.reference import build_reference_model, forward_sequence_logprobs
    from avr_megatron.training.runs import run_dpo, run_sft

    tmp = Path(tmp)
    tok = train_tiny_tokenizer(tmp / "tok")
    write_jsonl(sft_records(200, seed=1), tmp / "sft.jsonl")
    write_jsonl(preference_records(200, seed=2), tmp / "pairs.jsonl")
    write_jsonl(preference_records(64, seed=99), tmp / "heldout.jsonl")
    common = COMMON + [f"data.tokenizer={tok}"]
    out = {}

    sft_cfg = load_config(None, common + [f"data.train={tmp / 'sft.jsonl'}", "optimizer.lr=3e-3",
                                          "train.train_iters=60", f"run.dir={tmp / 'sft'}"])
    s = run_sft(sft_cfg, progress=False).summary
    out["sft"] = (s["first"]["loss"], s["last10_mean"]["loss"])

    dpo_overrides = common + [
        f"data.train={tmp / 'pairs.jsonl'}", "loss.reference=online", "loss.beta=0.1",
        "optimizer.lr=1e-3", "train.train_iters=100", f"run.dir={tmp / 'dpo'}",
        f"model.init_from.mcore={tmp / 'sft' / 'checkpoints'}"]
    dpo_cfg = load_config(None, dpo_overrides)
    result = run_dpo(dpo_cfg, progress=False)
    s = result.summary
    out["dpo"] = {"first_acc": s["first"]["rewards/accuracies"],
                  "acc": s["last10_mean"]["rewards/accuracies"],
                  "loss": (s["first"]["loss"], s["last10_mean"]["loss"]),
                  "init": s["init"]}

    # held-out pairs: implicit reward of the trained policy vs the reference
    held = load_config(None, dpo_overrides + [f"data.train={tmp / 'heldout.jsonl'}"])
    td = load_training_data(held, "preference")
    batches = [collate(td.data, td.plan, [b], td.chat.pad_id) for b in range(td.plan.num_bins)]
    seq = SequenceLogprobs(held.model.vocab_size, 256).sequences
    kw = dict(use_te=False, bf16=False, seq_length=128, bins_per_microbatch=1)
    policy = forward_sequence_logprobs(result.chunks, batches, seq, **kw)
    reference = forward_sequence_logprobs(build_reference_model(held), batches, seq, **kw)
    wins = []
    for b, p, r in zip(batches, policy, reference):
        margin = (p - r)[b.pair_chosen] - (p - r)[b.pair_rejected]
        wins += (margin > 0).tolist()
    out["heldout_acc"] = float(np.mean(wins))

    # non-finite steps: skipped and counted; too many in a row abort (same LR schedule in each
    # run below: lr_decay_iters fixed)
    common = common + ["scheduler.lr_decay_iters=6"]
    cfg = load_config(None, common + [f"data.train={tmp / 'sft.jsonl'}", "train.train_iters=6",
                                      f"run.dir={tmp / 'nan'}", "checkpoint.save_final=false"])
    data = load_training_data(cfg, "sft")
    layout = initialize(cfg)
    objective = _NaNAt(SFTObjective(vocab_size=cfg.model.vocab_size, use_te=False, bf16=False),
                       bad={2, 3})
    trainer = Trainer(cfg, objective, data, layout, use_te=uses_transformer_engine(cfg),
                      progress=False)
    r = trainer.run()
    out["nan"] = {"skipped": r.summary["last"]["skipped_steps"],
                  "last_loss_finite": math.isfinite(r.summary["last"]["loss"]), "status": r.status}
    cfg = load_config(None, common + [f"data.train={tmp / 'sft.jsonl'}", "train.train_iters=6",
                                      f"run.dir={tmp / 'nan2'}", "checkpoint.save_final=false",
                                      "train.max_consecutive_nonfinite=2"])
    objective = _NaNAt(SFTObjective(vocab_size=cfg.model.vocab_size, use_te=False, bf16=False),
                       bad={3, 4, 5})
    trainer = Trainer(cfg, objective, data, layout, use_te=False, progress=False)
    weights = None
    try:
        trainer.run()
        out["abort"] = "did not abort"
    except TrainingAborted as e:
        out["abort"] = str(e)
        weights = [p.detach().clone() for p in trainer.chunks[0].parameters()]
    # the skipped steps left the weights as they were after step 2: rerun 2 clean steps
    cfg2 = load_config(None, common + [f"data.train={tmp / 'sft.jsonl'}", "train.train_iters=2",
                                       f"run.dir={tmp / 'clean'}", "checkpoint.save_final=false",
                                       "train.max_consecutive_nonfinite=2"])
    clean = Trainer(cfg2, SFTObjective(vocab_size=cfg.model.vocab_size, use_te=False, bf16=False),
                    data, layout, use_te=False, progress=False)
    clean.run()
    out["skipped_left_weights"] = weights is not None and all(
        torch.equal(a, b) for a, b in zip(weights, clean.chunks[0].parameters()))
    return out


def test_sft_and_dpo_learn_and_nonfinite_steps_are_skipped(tmp_path):
    r = run_distributed(_case, nproc=1, tmp=str(tmp_path))[0]
    first, last = r["sft"]
    assert last < 0.5 * first, r["sft"]
    d = r["dpo"]
    assert d["init"].startswith("mcore:"), d
    assert d["first_acc"] < 0.5 and d["acc"] > 0.95, d
    assert d["loss"][1] < 0.5 * d["loss"][0], d
    assert r["heldout_acc"] > 0.95, r
    assert r["nan"] == {"skipped": 2, "last_loss_finite": True, "status": "finished"}, r["nan"]
    assert "2 steps in a row had non-finite loss" in r["abort"], r["abort"]
    assert r["skipped_left_weights"], r
