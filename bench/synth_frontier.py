"""Frontier batching vs one request at a time, same engine, same model, same prompts, one run.

Stage-1 trees (k criticisms x m improvements, scored) for N prompts with the transformers backend
on a small random Llama: (a) frontier: `run_frontier` hands every pending request of all N prompts
to the engine at once; (b) sequential: each prompt's machine is driven alone and every request
goes to the engine by itself. Both use per-request seeds, so they build the same trees up to float
rounding that depends on the batch shape (a near-tie token can flip): the fraction of identical
trees is reported. On a shared 2-core CPU the timings are noisy; the two modes run back to back
in one process. Prints a table and writes bench/results/synth_frontier.json (ratio
`frontier_vs_sequential` = frontier prompts/s / sequential prompts/s).

    PYTHONPATH=. python bench/synth_frontier.py [--prompts 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage1_machines(records, provenance, templates, k, m):
    from avr_megatron.method.stage1 import Stage1TreeBuilder

    return [Stage1TreeBuilder(r.prompt_id, r.x, r.y0, k=k, m=m, provenance=provenance, templates=templates,
                              max_rating_tries=1) for r in records]


def drive_alone(machine, generate, score) -> int:
    """One machine to completion, one request per engine call; returns the calls made."""
    from avr_megatron.method.requests import GenerateRequest

    calls = 0
    while not machine.done:
        request = machine.pending()[0]
        result = generate([request])[0] if isinstance(request, GenerateRequest) else score([request])[0]
        machine.feed({request.key: result})
        calls += 1
    return calls


def _sequential(machines, generate, score) -> int:
    return sum(drive_alone(machine, generate, score) for machine in machines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "synth_frontier.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from avr_megatron.config import load_config
    from avr_megatron.engines.hf import TransformersChatEngine, TransformersRewardEngine
    from avr_megatron.method.frontier import run_frontier
    from avr_megatron.method.prompts import PromptTemplates
    from avr_megatron.method.requests import SamplingParams
    from avr_megatron.method.tree import Provenance
    from avr_megatron.synth.fallback import CriticismCounter
    from avr_megatron.synth.inputs import load_prompts
    from avr_megatron.testing.tiny_hf import make_tiny_llama, make_tiny_reward_model, train_tiny_tokenizer

    cfg = load_config(None, [f"synth.input.path={REPO / 'data/prompts/tiny_prompts.jsonl'}",
                             "synth.input.fields.id=id", "synth.input.fields.answer=answer",
                             f"synth.input.limit={args.prompts}"])
    records = load_prompts(cfg.synth.input).records
    shape = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
                 num_heads=max(args.hidden // 64, 1), num_kv_heads=max(args.hidden // 128, 1))
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tiny_tokenizer(Path(tmp) / "tok")
        policy = make_tiny_llama(Path(tmp) / "policy", tok, **shape)
        reward = make_tiny_reward_model(Path(tmp) / "reward", tok, **shape)
        chat = TransformersChatEngine(str(policy), device="cpu", dtype="float32", batch_size=64)
        rm = TransformersRewardEngine(str(reward), device="cpu", dtype="float32", batch_size=64)
        templates = PromptTemplates()
        sampling = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.max_tokens, seed=1234)
        provenance = Provenance("bench-policy", "bench-reward", sampling)
        results = {}
        trees = {}
        for mode in ("frontier", "sequential"):
            counter = CriticismCounter(templates, enabled=True)

            def generate(requests, _c=counter):
                return _c(requests, [list(t) for t in chat.generate(requests)])

            machines = stage1_machines(records, provenance, templates, args.k, args.m)
            before = dict(chat.stats)
            start = time.perf_counter()
            if mode == "frontier":
                calls = run_frontier(machines, generate, rm.score)
            else:
                calls = _sequential(machines, generate, rm.score)
            seconds = time.perf_counter() - start
            generated = chat.stats["generated_tokens"] - before["generated_tokens"]
            trees[mode] = [m.tree.to_dict() for m in machines]
            results[mode] = {"seconds": round(seconds, 3), "prompts_per_s": round(len(records) / seconds, 3),
                             "engine_calls": calls, "generated_tokens": generated,
                             "generated_tokens_per_s": round(generated / seconds, 1)}

    def texts(tree_list):
        return [[c["answer"] for c in t["root"]["children"]] for t in tree_list]

    ratio = results["frontier"]["prompts_per_s"] / results["sequential"]["prompts_per_s"]
    report = {
        "benchmark": "synth_frontier",
        "what": "stage-1 trees (k x m, scored), transformers backend on CPU, frontier batching vs one request per engine call",
        "prompts": len(records), "k": args.k, "m": args.m, "max_tokens": args.max_tokens,
        "model": {"hidden_size": args.hidden, "layers": args.layers, "dtype": "float32"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "frontier": results["frontier"], "sequential": results["sequential"],
        "frontier_vs_sequential": round(ratio, 3),
        "identical_trees": texts(trees["frontier"]) == texts(trees["sequential"]),
        "identical_tree_fraction": sum(a == b for a, b in zip(texts(trees["frontier"]), texts(trees["sequential"]))) / len(records),
    }
    print(f"{'mode':<12}{'seconds':>10}{'prompts/s':>12}{'engine calls':>14}{'gen tok/s':>12}")
    for mode in ("frontier", "sequential"):
        r = results[mode]
        print(f"{mode:<12}{r['seconds']:>10.2f}{r['prompts_per_s']:>12.2f}{r['engine_calls']:>14}"
              f"{r['generated_tokens_per_s']:>12.1f}")
    print(f"frontier_vs_sequential = {ratio:.2f}x   identical trees: {report['identical_trees']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
