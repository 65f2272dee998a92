"""Throughput of a DPO step against an SFT step on the same packed tokens: DPO with stored
(precomputed) reference log-probs should cost what SFT costs (goal: >= 0.9 of its tokens/s);
online reference log-probs add one forward pass of the reference model per step.

All three run on the same model, optimizer and bins (the SFT step trains the same sequences with
token-level cross-entropy on the same masks), interleaved step by step so that machine noise
hits them alike. Tokens/s counts real (non-pad) tokens. On CPU the model is small; MFU for 1B-3B
shapes in bf16/FP8 needs a GPU and is not measured here.

    python bench/dpo_vs_sft.py [--steps 6] [--hidden 256] [--layers 4] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import table, write


def _records(n: int, seed: int = 0) -> list[dict]:
    from avr_megatron.testing.toy_data import NEGATIVE, POSITIVE, TOPICS

    rng = random.Random(seed)
    words = lambda pool, k: " ".join(rng.choice(pool) for _ in range(k))  # noqa: E731
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": words(TOPICS, rng.randint(20, 80))}],
             "chosen": [{"role": "assistant", "content": words(POSITIVE + TOPICS, rng.randint(30, 150))}],
             "rejected": [{"role": "assistant", "content": words(NEGATIVE + TOPICS, rng.randint(30, 150))}],
             "reward_gap": 1.0} for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-length", type=int, default=1024)
    args = ap.parse_args(argv)

    import torch

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import collate
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.data.sampler import StepSampler
    from avr_megatron.models.llama import build_model, unwrap
    from avr_megatron.runtime.distributed import initialize, seed_everything
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import write_jsonl
    from avr_megatron.training.losses.common import SequenceLogprobs
    from avr_megatron.training.losses.preference import PreferenceObjective
    from avr_megatron.training.losses.sft import SFTObjective
    from avr_megatron.training.reference import (
        OnlineReference,
        PrecomputedReference,
        build_reference_model,
        compute_store,
    )
    from avr_megatron.training.setup import build_optimizer, build_scheduler, wrap_ddp
    from avr_megatron.training.schedule import forward_backward

    work = tempfile.TemporaryDirectory(prefix="avr-bench-")
    tmp = Path(work.name)
    tok = train_tiny_tokenizer(tmp / "tok")
    write_jsonl(_records(64), tmp / "pairs.jsonl")
    L = args.seq_length
    cfg = load_config(None, [
        "model.num_layers=%d" % args.layers, "model.hidden_size=%d" % args.hidden,
        "model.ffn_hidden_size=%d" % (args.hidden * 11 // 4), "model.num_attention_heads=8",
        "model.num_query_groups=4", "model.vocab_size=%d" % args.vocab,
        f"model.max_position_embeddings={L}", f"train.seq_length={L}",
        "train.micro_batch_size=2", "train.global_batch_size=4", f"run.dir={tmp / 'run'}",
        f"data.train={tmp / 'pairs.jsonl'}", f"data.tokenizer={tok}",
        f"logps.path={tmp / 'ref_logps'}", "optimizer.lr=1e-5"])
    td = load_training_data(cfg, "preference")
    layout = initialize(cfg)
    seed_everything(cfg.run.seed)
    chunks = build_model(cfg)
    for c in chunks:
        unwrap(c).config.calculate_per_token_loss = True
    chunks = wrap_ddp(chunks, cfg)
    optimizer = build_optimizer(chunks, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    ref_chunks = build_reference_model(cfg)
    compute_store(cfg, td, ref_chunks, layout, use_te=False, progress=False)
    vocab = cfg.model.vocab_size
    seq = SequenceLogprobs(vocab, 0).sequences
    objectives = {
        "sft": SFTObjective(vocab_size=vocab, use_te=False, bf16=False),
        "dpo_precomputed": PreferenceObjective(cfg.loss, vocab_size=vocab, use_te=False,
                                               bf16=False,
                                               reference=PrecomputedReference.load(cfg, td)),
        "dpo_online": PreferenceObjective(cfg.loss, vocab_size=vocab, use_te=False, bf16=False,
                                          reference=OnlineReference(
                                              ref_chunks, seq, use_te=False, bf16=False,
                                              seq_length=L, bins_per_microbatch=2)),
    }
    sampler = StepSampler(td.plan.num_bins, 4, seed=0)
    elapsed = {k: 0.0 for k in objectives}
    tokens = {k: 0 for k in objectives}
    for step in range(args.warmup + args.steps):
        bins = sampler.global_batch(step)
        real = int(td.plan.fill[bins].sum())
        for name, objective in objectives.items():
            batches = [collate(td.data, td.plan, bins[i:i + 2], td.chat.pad_id)
                       for i in range(0, len(bins), 2)]
            t0 = time.perf_counter()
            objective.prepare(batches)
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(objective.forward_step, batches, chunks, seq_length=L,
                             micro_batch_size=2)
            optimizer.step()
            scheduler.step(1)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                elapsed[name] += dt
                tokens[name] += real
    tps = {k: tokens[k] / elapsed[k] for k in objectives}
    rows = [{"step": k, "tokens_per_second": tps[k], "seconds_per_step": elapsed[k] / args.steps,
             "vs_sft": tps[k] / tps["sft"]} for k in objectives]
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, 4 bins x {L} tokens "
          f"per step ({td.plan.efficiency:.2%} real), {args.steps} timed steps each, "
          f"{torch.get_num_threads()} CPU threads:")
    print(table(rows, ["step", "tokens_per_second", "seconds_per_step", "vs_sft"]))
    write("dpo_vs_sft", {
        "config": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                   "seq_length": L, "bins_per_step": 4, "steps": args.steps, "device": "cpu",
                   "packing_efficiency": td.plan.efficiency},
        "tokens_per_second": tps,
        "dpo_vs_sft": tps["dpo_precomputed"] / tps["sft"],
        "dpo_online_vs_sft": tps["dpo_online"] / tps["sft"],
        "dpo_online_vs_dpo_precomputed": tps["dpo_online"] / tps["dpo_precomputed"],
        "goal": "dpo_vs_sft >= 0.9"})
    work.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
