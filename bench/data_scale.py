"""Training data at scale: tokenise-once prepared data against every rank tokenising in memory.

For each dataset size (default 20k and 100k realistic preference pairs: multi-paragraph chat
text with lists and code blocks, a system + user prompt, ~3.3k tokens per pair with the tiny test
tokenizer), in one run, each measurement in a fresh process:

  uncached   data.prepared=in_memory: what every rank did before (read, tokenise, pack)
  build      data.prepared=auto on an empty cache: the first use, building with every core
  cached     data.prepared=auto again: a second process mapping the prepared data

Each process times its data start-up (from the recipe to the first global batch collated:
load_training_data, the step sampler, the first rank's microbatches) and reports its peak
resident memory (VmHWM, which counts the mapped pages it touched). Figures:

  cached_vs_uncached_startup   uncached data start-up / cached data start-up (goal >= 20)
  rss_growth_bytes_per_pair    (peak RSS of cached processes at the largest size - at the
                               smallest) / (difference in pairs)          (goal < 1,000)
  build pairs/s                pairs / first-use build time, every core

    python bench/data_scale.py [--sizes 20000,100000] [--work DIR] [--seq-length 4096]

Run it alone (`flock /work/wt/heavy.lock ...` on shared machines): timings and memory are
whole-machine figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from common import table, write

_CHILD = """
import json, sys, time
t_start = time.time()
import numpy as np
from avr_megatron.config import load_config
from avr_megatron.data.batches import collate
from avr_megatron.data.dataset import load_training_data
from avr_megatron.runtime.files import atomic_file
from avr_megatron.data.sampler import StepSampler
t_import = time.time()
cfg = load_config(None, json.loads(sys.argv[1]))
t0 = time.time()
td = load_training_data(cfg, "preference")
t_loaded = time.time()
sampler = StepSampler(td.plan.num_bins, cfg.train.global_batch_size, cfg.run.seed)
bins = sampler.rank_batch(0, 0, 8)  # rank 0 of 8 data-parallel ranks, first step
batch = collate(td.data, td.plan, bins, td.chat.pad_id)
t_batch = time.time()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda k: int(status[k].split()[0]) * 1024
print("RESULT " + json.dumps({
    "data_startup_s": t_batch - t0, "load_s": t_loaded - t0, "import_s": t_import - t_start,
    "peak_rss_bytes": kib("VmHWM"), "rss_bytes": kib("VmRSS"),
    "rss_anon_bytes": kib("RssAnon"), "rss_file_bytes": kib("RssFile"),
    "pairs": len(td.data), "tokens": td.data.summary.tokens, "bins": td.plan.num_bins,
    "prepared": str(td.prepared) if td.prepared else None}))
"""


def _text(rng: random.Random, words: list[str], n: int) -> str:
    """Chat-like text of about n words: paragraphs, numbered lists and code blocks."""
    parts = []
    while n > 0:
        r = rng.random()
        if r < 0.6:
            k = rng.randint(30, 90)
            parts.append(_para(rng, words, k))
        elif r < 0.8:
            items = rng.randint(3, 6)
            parts.append("\n".join(f"{i + 1}. " + _para(rng, words, 8) for i in range(items)))
            k = 8 * items
        else:
            k = rng.randint(10, 30)
            lines = [f"x{i} = {rng.randint(0, 999)} + {rng.choice(words)}"
                     for i in range(k // 3 + 1)]
            parts.append("```python\n" + "\n".join(lines) + "\n```")
        n -= k
    return "\n\n".join(parts)


def _para(rng: random.Random, words: list[str], n: int) -> str:
    out = []
    while n > 0:
        k = rng.randint(6, 18)
        n -= k
        s = " ".join(rng.choice(words) for _ in range(k)).capitalize()
        out.append(s + rng.choice(".....?!:"))
    return " ".join(out)


def write_pairs(path: Path, n: int, seed: int = 0, pool: int = 3000) -> Path:
    """n preference pairs composed from pools of distinct texts (fast to write; every pair a
    distinct combination, so nothing is tokenised twice in the same way)."""
    from avr_megatron.testing.tiny_hf import _WORDS

    words = list(_WORDS)
    rng = random.Random(seed)
    prompts = [_text(rng, words, 107) for _ in range(pool)]
    chosen = [_text(rng, words, 353) for _ in range(pool)]
    rejected = [_text(rng, words, 328) for _ in range(pool)]
    with atomic_file(path, sync=False) as tmp, open(tmp, "w") as f:
        for i in range(n):
            prompt = [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": rng.choice(prompts)}]
            f.write(json.dumps({
                "id": f"pair-{i}", "prompt": prompt,
                "chosen": [{"role": "assistant", "content": rng.choice(chosen)}],
                "rejected": [{"role": "assistant", "content": rng.choice(rejected)}],
                "reward_gap": round(rng.uniform(0.1, 2.0), 4)}) + "\n")
    return path


def _child(overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides)],
                          capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "process_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--work", default="/tmp/avr-data-scale")
    ap.add_argument("--seq-length", type=int, default=4096)
    args = ap.parse_args(argv)
    import shutil

    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(work / "tokenizer")
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in sizes:
        data = work / f"pairs-{n}.jsonl"
        if not data.exists():
            t = time.time()
            write_pairs(data, n)
            print(f"wrote {n} pairs ({data.stat().st_size / 2**20:.0f} MiB) in "
                  f"{time.time() - t:.0f} s", flush=True)
        cache = work / f"prepared-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        base = [f"data.train={data}", f"data.tokenizer={tok}", f"run.dir={work / 'run'}",
                f"train.seq_length={args.seq_length}", "model.vocab_size=384",
                f"model.max_position_embeddings={args.seq_length}",
                "train.global_batch_size=64", "data.overlong=truncate",
                f"data.prepared_dir={cache}"]
        for mode, extra in (("uncached", ["data.prepared=in_memory"]), ("build", []),
                            ("cached", ["data.prepared=required"])):
            r = _child(base + extra)
            r.update(mode=mode, size=n)
            rows.append(r)
            print(f"{n} pairs, {mode}: data start-up {r['data_startup_s']:.2f} s, process "
                  f"{r['process_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                  flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    by = {(r["mode"], r["size"]): r for r in rows}
    summary = []
    for n in sizes:
        u, b, c = by["uncached", n], by["build", n], by["cached", n]
        summary.append({
            "pairs": n, "tokens_per_pair": round(c["tokens"] / c["pairs"], 1),
            "uncached_startup_s": round(u["data_startup_s"], 3),
            "build_s": round(b["data_startup_s"], 3),
            "build_pairs_per_s": round(n / b["data_startup_s"], 1),
            "cached_startup_s": round(c["data_startup_s"], 3),
            "cached_vs_uncached_startup": round(u["data_startup_s"] / c["data_startup_s"], 1),
            "cached_vs_uncached_process": round(u["process_s"] / c["process_s"], 1),
            "uncached_peak_rss_mib": round(u["peak_rss_bytes"] / 2**20),
            "cached_peak_rss_mib": round(c["peak_rss_bytes"] / 2**20)})
    lo, hi = sizes[0], sizes[-1]
    growth = {mode: (by[mode, hi]["peak_rss_bytes"] - by[mode, lo]["peak_rss_bytes"]) / (hi - lo)
              for mode in ("uncached", "cached")} if hi > lo else {}
    print(table(summary, list(summary[0])))
    ratio = min(s["cached_vs_uncached_startup"] for s in summary)
    figures = {"cached_vs_uncached_startup": ratio,
               "rss_growth_bytes_per_pair": round(growth.get("cached", float("nan")), 1),
               "uncached_rss_growth_bytes_per_pair": round(growth.get("uncached", float("nan")),
                                                           1),
               "build_pairs_per_s": summary[-1]["build_pairs_per_s"], "build_workers": cores}
    print("\n" + "\n".join(f"{k}: {v}" for k, v in figures.items()))
    write("data_scale", {
        "how": "each mode in a fresh process; data start-up = load_training_data + step sampler"
               " + first rank's microbatch of the first step (rank 0 of 8 DP ranks, global batch"
               " 64 bins); peak RSS = VmHWM (counts touched mapped pages); ratios = smallest "
               "over sizes; rss growth between the smallest and largest size; build uses every "
               f"core ({cores})",
        "goals": {"cached_vs_uncached_startup": ">= 20", "rss_growth_bytes_per_pair": "< 1000"},
        "seq_length": args.seq_length, "figures": figures, "sizes": summary, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
