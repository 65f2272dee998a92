"""Where a forward pass over packed bins spends its time on the local (non-TE) spec, before and
after issue 18: Megatron-Core's own unfused DotProductAttention with a [b, 1, s, s] block mask
built per micro-batch over whole bins ("before"), against SDPA core attention on segment ids
(models/attention.py), then with micro-batches trimmed to their fullest bin, then the same with
the CPU compatibility layer's TorchFunctionMode switched off for the forward (its per-op cost).

Same weights, same bins (one bin per micro-batch, as `avr logps` and `avr train dpo` run by
default); each forward is followed by the per-sequence log-probs. Times are CPU seconds of this
process (robust to other jobs on a shared machine; with --threads 1 they equal compute time),
split by module hooks into core attention, the rest of attention (QKV/output projections,
RoPE), MLP, log-probs, input preparation (the block mask) and other (embedding, norms, output
layer). Writes bench/results/forward_split.json.

    python bench/forward_split.py [--shapes long mixed] [--bins 8] [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import table, write

PARTS = ("attention_core", "attention_rest", "mlp", "logprobs", "inputs", "other")


class Timers:
    """CPU time per module kind, from forward pre/post hooks on every layer."""

    def __init__(self, model):
        from avr_megatron.models.llama import unwrap

        self.t = defaultdict(float)
        self.handles = []
        for layer in unwrap(model).decoder.layers:
            for name, mod in (("core", layer.self_attention.core_attention),
                              ("attention", layer.self_attention), ("mlp", layer.mlp)):
                self.handles += [mod.register_forward_pre_hook(self._pre),
                                 mod.register_forward_hook(self._post(name))]

    def remove(self):
        for h in self.handles:
            h.remove()

    @staticmethod
    def _pre(module, args):
        module._bench_t0 = time.process_time()

    def _post(self, name):
        def hook(module, args, out):
            self.t[name] += time.process_time() - module._bench_t0
        return hook


def measure(model, batches, *, unfused: bool, vocab: int, reps: int) -> dict:
    import torch

    from avr_megatron.data.batches import block_causal_mask
    from avr_megatron.training.losses.common import SequenceLogprobs

    seq = SequenceLogprobs(vocab, 0)
    timers = Timers(model)
    best = None
    for rep in range(reps + 1):
        timers.t.clear()
        split = defaultdict(float)
        with torch.no_grad():
            for b in batches:
                t0 = time.process_time()
                mask = block_causal_mask(b.segment) if unfused else b.segment
                t1 = time.process_time()
                logits = model(b.tokens, b.position_ids, mask)
                t2 = time.process_time()
                seq.sequences(logits, b)
                t3 = time.process_time()
                split["inputs"] += t1 - t0
                split["forward"] += t2 - t1
                split["logprobs"] += t3 - t2
        split["attention_core"] = timers.t["core"]
        split["attention_rest"] = timers.t["attention"] - timers.t["core"]
        split["mlp"] = timers.t["mlp"]
        split["other"] = split["forward"] - timers.t["attention"] - timers.t["mlp"]
        split["total"] = split["forward"] + split["logprobs"] + split["inputs"]
        if rep and (best is None or split["total"] < best["total"]):  # rep 0 warms up
            best = dict(split)
    timers.remove()
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["long", "mixed"])
    ap.add_argument("--bins", type=int, default=8, help="bins (micro-batches of one) per shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (the fastest counts)")
    ap.add_argument("--seq-length", type=int, default=1024)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from transformers import AutoTokenizer

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import collate
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.models import llama
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime import cpu_compat
    from avr_megatron.runtime.distributed import initialize, seed_everything
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import write_jsonl
    from dpo_vs_trl import make_pairs

    work = tempfile.TemporaryDirectory(prefix="avr-bench-split-")
    tmp = Path(work.name)
    tok_dir = train_tiny_tokenizer(tmp / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    L = args.seq_length
    model_keys = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=704",
                  "model.num_attention_heads=8", "model.num_query_groups=4",
                  "model.vocab_size=400", f"model.max_position_embeddings={L}",
                  f"train.seq_length={L}", f"run.dir={tmp / 'run'}", f"data.tokenizer={tok_dir}"]
    cfg = load_config(None, model_keys)
    initialize(cfg)
    seed_everything(0)
    ours = llama.build_model(cfg)[0]
    weights = gather_full([ours], False)
    saved = llama.layer_spec
    llama.layer_spec = lambda use_te: get_gpt_layer_local_spec(normalization="RMSNorm")
    try:
        unfused = llama.build_model(cfg)[0]
    finally:
        llama.layer_spec = saved
    load_full_state_dict([unfused], weights, False)
    for m in (ours, unfused):
        m.eval()

    rows, results = [], {}
    for shape in args.shapes:
        write_jsonl(make_pairs(tok, shape, 4 * args.bins, L), tmp / f"{shape}.jsonl")
        td = load_training_data(load_config(None, model_keys + [f"data.train={tmp / f'{shape}.jsonl'}"]),
                                "preference")
        bins = list(range(min(args.bins, td.plan.num_bins)))
        full = [collate(td.data, td.plan, [b], td.chat.pad_id) for b in bins]
        cut = [collate(td.data, td.plan, [b], td.chat.pad_id, trim=True) for b in bins]
        real = int(td.plan.fill[bins].sum())
        variants = {
            "before: Megatron unfused attention, block mask, whole bins":
                lambda: measure(unfused, full, unfused=True, vocab=400, reps=args.reps),
            "SDPA per sequence, whole bins":
                lambda: measure(ours, full, unfused=False, vocab=400, reps=args.reps),
            "after: SDPA per sequence, trimmed micro-batches":
                lambda: measure(ours, cut, unfused=False, vocab=400, reps=args.reps),
        }
        results[shape] = {"bins": len(bins), "real_tokens": real, "variants": {}}
        for name, run in variants.items():
            results[shape]["variants"][name] = run()
        # the CPU compatibility layer's per-op cost: the same forward without its mode
        mode = cpu_compat._mode
        if mode is not None:
            mode.__exit__(None, None, None)
            try:
                results[shape]["variants"]["after, CPU-compat mode off"] = measure(
                    ours, cut, unfused=False, vocab=400, reps=args.reps)
            finally:
                mode.__enter__()
        for name, s in results[shape]["variants"].items():
            rows.append({"shape": shape, "variant": name,
                         **{p: 1e3 * s[p] / len(bins) for p in PARTS},
                         "total": 1e3 * s["total"] / len(bins),
                         "tok/cpu-s": real / s["total"]})
        before = results[shape]["variants"][next(iter(variants))]["total"]
        results[shape]["speedup_after_vs_before"] = before / results[shape]["variants"][
            "after: SDPA per sequence, trimmed micro-batches"]["total"]
    print(f"Forward + log-probs per bin (ms of CPU time, {args.threads} thread(s)), 4 layers, "
          f"hidden 256, 8 heads / 4 KV groups, vocab 400, {L}-token bins:")
    print(table(rows, ["shape", "variant", *PARTS, "total", "tok/cpu-s"]))
    for shape, r in results.items():
        print(f"[{shape}] after vs before: {r['speedup_after_vs_before']:.2f}x")
    write("forward_split", {"config": vars(args), "unit": "CPU seconds over all bins",
                            "shapes": results})
    work.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
