"""avr against TRL's DPOTrainer on the same DPO work: same random Llama, same preference pairs
(TRL conversational format, tokenised to the same lengths by both), same pairs per optimizer
step, dtype, optimizer (AdamW, constant LR, clip 1.0), beta and CPU threads.

TRL runs in a throwaway venv (`--trl-venv`, created on first use) holding only `trl` and
`accelerate` installed with `--no-deps` on top of this project's own torch and transformers (a
.pth file points at .venv's site-packages), so both sides run the same kernels. avr runs its own
commands (`avr logps`, `avr train dpo`) as a user would.

Two data shapes: `long` (every pair, prompt + chosen + prompt + rejected, is longer than half a
bin, so packing cannot put two in one bin) and `mixed` (chat-like pairs of 100-1000 tokens, where
avr packs and TRL pads each micro-batch to its longest row). Per shape it reports steady useful
(non-padding) tokens/s of training with precomputed and with online reference log-probs, and the
reference pass (`avr logps` against TRL's precompute_ref_log_probs) as seconds and tokens/s;
ratios are avr / TRL (> 1: avr faster). The first optimizer step's loss must be log 2 on both
sides (policy = reference). Writes bench/results/dpo_vs_trl.json. Not part of CI (installs TRL).

Useful tokens are the same on both sides: every pair's prompt + chosen + prompt + rejected
tokens, padding excluded. avr computes a pair's shared prompt once (`data.share_prompt`, on by
default on the local spec: `--share-prompt false` turns it off) and still counts it twice, as
TRL's rows hold it twice: the figure is work done per second, not tokens computed.

    python bench/dpo_vs_trl.py [--shapes long mixed] [--pairs 128] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table, write

REPO = Path(__file__).resolve().parents[1]
# Versions this comparison was run with (TRL 1.16 is the DPOTrainer the issue measured;
# accelerate 1.16 is the release it was tested against). Installed with --no-deps.
TRL_PINS = ("trl==1.16.0", "accelerate==1.16.0")
GOALS = {"long": {"train_precomputed": 1.0, "train_online": 1.0, "reference_pass": 1.0},
         "mixed": {"train_precomputed": 1.3, "train_online": 1.3}}


# ------------------------------------------------------------------------------------------
# Pure parts (tested in tests/bench/test_dpo_vs_trl.py)

def target_pair_lengths(shape: str, n: int, seq_length: int, seed: int = 0) -> list[int]:
    """Token counts of whole pairs (prompt + chosen + prompt + rejected): `long` pairs are
    longer than half a bin (57%-98% of it), `mixed` ones uniform over 100-1000 tokens (capped
    at 98% of a bin)."""
    rng = random.Random(seed)
    hi = int(seq_length * 0.98)
    if shape == "long":
        lo = seq_length // 2 + max(16, seq_length // 16)
    elif shape == "mixed":
        lo, hi = min(100, hi), min(1000, hi)
    else:
        raise ValueError(f"unknown shape {shape!r} (long | mixed)")
    return [rng.randint(lo, hi) for _ in range(n)]


def split_pair(total: int, rng: random.Random) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts with 2 * prompt + chosen + rejected = total: a
    prompt of 8-25% of each sequence, the two answers of different lengths."""
    prompt = max(4, int(total / 2 * rng.uniform(0.08, 0.25)))
    rest = total - 2 * prompt
    chosen = max(2, int(rest * rng.uniform(0.35, 0.65)))
    return prompt, chosen, max(2, rest - chosen)


def steady_rate(steps: list[dict], warmup: int) -> dict:
    """Useful tokens/s over the steps after `warmup` (each step: seconds, real tokens, padded
    tokens, pairs), plus the padding share and pairs per step."""
    timed = steps[warmup:]
    if not timed:
        raise ValueError(f"no steps after {warmup} warm-up steps")
    seconds = sum(s["seconds"] for s in timed)
    real = sum(s["real"] for s in timed)
    padded = sum(s["padded"] for s in timed)
    return {"tokens_per_second": real / seconds, "seconds_per_step": seconds / len(timed),
            "real_fraction": real / padded if padded else None,
            "pairs_per_step": sum(s["pairs"] for s in timed) / len(timed), "steps": len(timed)}


def computed_tokens(data, share: bool) -> int:
    """Tokens avr computes for all pairs: each shared prompt once with `share` (the local spec
    on CPU, where this benchmark runs avr), else the useful tokens."""
    from avr_megatron.data.batches import shared_prompt

    total = int(data.unit_lengths.sum())
    if share:
        total -= sum(shared_prompt(*(data.sequence(s) for s in data.unit_sequences(u)))
                     for u in range(len(data)))
    return total


def best_of(runs: list[dict]) -> dict:
    """One side's figures over repeated runs: each training mode from its fastest run, the
    reference pass from its fastest run (interference on a shared machine only slows a run
    down). Every run's figures are kept under "runs"."""
    best = dict(runs[0])
    for mode in ("precomputed", "online"):
        if all(mode in r for r in runs):
            best[mode] = max((r[mode] for r in runs), key=lambda m: m["tokens_per_second"])
    if all(r.get("reference_pass") for r in runs):
        best["reference_pass"] = min((r["reference_pass"] for r in runs),
                                     key=lambda p: p["seconds"])
    best["runs"] = [{k: v for k, v in r.items() if k != "pair_tokens"} for r in runs]
    return best


def ratios(avr: dict, trl: dict) -> dict:
    """avr / TRL speed ratios of one shape (training tokens/s; reference pass by time)."""
    out = {f"train_{m}": avr[m]["tokens_per_second"] / trl[m]["tokens_per_second"]
           for m in ("precomputed", "online") if m in avr and m in trl}
    if avr.get("reference_pass") and trl.get("reference_pass"):
        out["reference_pass"] = trl["reference_pass"]["seconds"] / avr["reference_pass"]["seconds"]
    return out


def goal_status(shape: str, r: dict) -> dict:
    """Each goal of the issue for this shape: the threshold, the measured ratio, met or not."""
    return {k: {"goal": g, "ratio": r.get(k), "met": r.get(k) is not None and r[k] >= g}
            for k, g in GOALS.get(shape, {}).items()}


# ------------------------------------------------------------------------------------------
# Workspace: tokenizer, model, data

def _words_for(tok, n_tokens: int, rng: random.Random) -> str:
    from avr_megatron.testing.tiny_hf import _WORDS

    words: list[str] = []
    while True:
        words += [rng.choice(_WORDS) for _ in range(max(1, (n_tokens - len(words)) // 2))]
        text = " ".join(words)
        have = len(tok(text, add_special_tokens=False)["input_ids"])
        if have >= n_tokens:
            while have > n_tokens and len(words) > 1:
                words.pop()
                text = " ".join(words)
                have = len(tok(text, add_special_tokens=False)["input_ids"])
            return text


def _rendered_pair_tokens(tok, rec: dict) -> int:
    full = lambda msgs: len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)  # noqa: E731
                            ["input_ids"])
    return full(rec["prompt"] + rec["chosen"]) + full(rec["prompt"] + rec["rejected"])


def make_pairs(tok, shape: str, n: int, seq_length: int, seed: int = 0) -> list[dict]:
    """Records in TRL's conversational format whose rendered pair lengths follow
    target_pair_lengths (within a few tokens; `long` ones always over half a bin and within one)."""
    rng = random.Random(seed + 1)
    records = []
    for i, total in enumerate(target_pair_lengths(shape, n, seq_length, seed)):
        overhead = 2 * 12  # chat-template tokens per sequence (headers, bos, eot), roughly
        p, c, r = split_pair(max(total - overhead, 16), rng)
        rec = {"id": f"{shape}-{i}", "prompt": [{"role": "user", "content": _words_for(tok, p, rng)}],
               "chosen": [{"role": "assistant", "content": _words_for(tok, c, rng)}],
               "rejected": [{"role": "assistant", "content": _words_for(tok, r, rng)}],
               "reward_gap": 1.0}
        have = _rendered_pair_tokens(tok, rec)
        if have != total:  # shift the difference onto the chosen answer
            rec["chosen"][0]["content"] = _words_for(tok, max(2, c + total - have), rng)
            have = _rendered_pair_tokens(tok, rec)
        if shape == "long" and not (seq_length // 2 < have <= seq_length):
            raise RuntimeError(f"could not make a long pair of {total} tokens (got {have})")
        records.append(rec)
    return records


def make_model(work: Path, args) -> tuple[Path, Path]:
    from avr_megatron.testing.tiny_hf import make_tiny_llama, train_tiny_tokenizer

    tok = train_tiny_tokenizer(work / "tokenizer", vocab_size=args.vocab)
    model = make_tiny_llama(work / "model", tok, seed=0, num_layers=args.layers,
                            hidden_size=args.hidden, intermediate_size=args.ffn,
                            num_heads=args.heads, num_kv_heads=args.kv_heads,
                            max_position_embeddings=args.seq_length)
    return tok, model


# ------------------------------------------------------------------------------------------
# Runners

def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"})
    return env


def _run(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log "
                           f"{log}:\n{tail}")


def ensure_trl_venv(path: Path) -> Path:
    """A venv with only trl + accelerate (--no-deps); the project's site-packages via .pth."""
    python = path / "bin" / "python"
    marker = path / ".avr-bench-pins"
    if python.exists() and marker.is_file() and marker.read_text() == "\n".join(TRL_PINS):
        return python
    import site

    subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(path)], check=True)
    site_packages = next(Path(p) for p in site.getsitepackages() if p.endswith("site-packages"))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (path / "lib" / ver / "site-packages" / "_avr_project.pth").write_text(f"{site_packages}\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *TRL_PINS],
                   check=True)
    marker.write_text("\n".join(TRL_PINS))
    return python


def avr_overrides(args, work: Path, shape: str, model: Path, tok: Path, bins_per_step: int,
                  mode: str) -> list[str]:
    run = work / f"avr-{shape}-{mode}"
    return [
        f"run.dir={run}", f"model.init_from.hf={model}", "model.init_from.mcore=null",
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.kv_heads}", f"model.vocab_size={args.vocab}",
        f"model.max_position_embeddings={args.seq_length}",
        f"data.train={work / f'pairs-{shape}.jsonl'}", f"data.tokenizer={tok}",
        f"logps.path={work / f'ref-{shape}'}", f"train.seq_length={args.seq_length}",
        f"train.micro_batch_size={args.avr_micro_bins}",
        f"train.global_batch_size={bins_per_step}", f"train.train_iters={args.warmup + args.steps}",
        "train.log_interval=1", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        "optimizer.adam_beta1=0.9", "optimizer.adam_beta2=0.95", "optimizer.clip_grad=1.0",
        "scheduler.decay_style=constant", "scheduler.warmup_iters=0",
        f"loss.beta={args.beta}", "loss.type=sigmoid", f"loss.reference={mode}",
        f"data.share_prompt={'null' if args.share_prompt == 'auto' else 'false'}",
        "checkpoint.save_interval=0", "checkpoint.save_final=false",
        "logging.tensorboard=false", "logging.progress_bar=false",
        f"precision.bf16={'true' if args.bf16 else 'false'}"]


def run_avr(args, work: Path, shape: str, model: Path, tok: Path, bins_per_step: int) -> dict:
    env = _env(args.threads)
    cli = [sys.executable, "-m", "avr_megatron.cli.main"]
    recipe = ["--recipe", str(REPO / "recipes" / "tiny_dpo.yaml")]
    out: dict = {}
    ref_dir = work / f"ref-{shape}"
    if (ref_dir / "stamp.json").exists():
        (ref_dir / "stamp.json").unlink()  # always recompute: the reference pass is measured
    over = avr_overrides(args, work, shape, model, tok, bins_per_step, "precomputed")
    _run(cli + ["logps"] + recipe + over, env, work / f"avr-{shape}-logps.log")
    stamp = json.loads((ref_dir / "stamp.json").read_text())
    out["reference_pass"] = {"seconds": stamp["seconds"]}
    for mode in ("precomputed", "online"):
        over = avr_overrides(args, work, shape, model, tok, bins_per_step, mode)
        run_dir = work / f"avr-{shape}-{mode}"
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        _run(cli + ["train", "dpo"] + recipe + over, env, work / f"avr-{shape}-{mode}.log")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if x.strip()]
        steps = [{"seconds": r["seconds"], "real": r["tokens_per_second"] * r["seconds"],
                  "padded": args.seq_length * bins_per_step, "pairs": r["pairs"],
                  "loss": r["loss"]} for r in rows if "seconds" in r]
        out[mode] = {**steady_rate(steps, args.warmup), "first_loss": steps[0]["loss"]}
    return out


def run_trl(args, work: Path, shape: str, model: Path, python: Path) -> dict:
    env = _env(args.threads)
    out: dict = {}
    for mode in ("precomputed", "online"):
        result = work / f"trl-{shape}-{mode}.json"
        _run([str(python), str(REPO / "bench" / "trl_dpo_side.py"), "--model", str(model),
              "--data", str(work / f"pairs-{shape}.jsonl"), "--out", str(result),
              "--workdir", str(work / f"trl-{shape}-{mode}"), "--mode", mode,
              "--pairs-per-step", str(args.pairs_per_step), "--micro-pairs", str(args.trl_micro_pairs),
              "--steps", str(args.warmup + args.steps), "--max-length", str(args.seq_length),
              "--beta", str(args.beta), "--lr", str(args.lr), "--threads", str(args.threads)]
             + (["--bf16"] if args.bf16 else []), env, work / f"trl-{shape}-{mode}.log")
        r = json.loads(result.read_text())
        out[mode] = {**steady_rate(r["steps"], args.warmup), "first_loss": r["steps"][0]["loss"]}
        if mode == "precomputed":
            out["reference_pass"] = {"seconds": r["ref_pass_seconds"]}
            out["pair_tokens"] = r["pair_tokens"]
            out["versions"] = r["versions"]
    return out


def _commit() -> str | None:
    """The avr commit measured: git's HEAD, else $AVR_BENCH_COMMIT (a run from an exported
    copy of the tree)."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else os.environ.get("AVR_BENCH_COMMIT")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["long", "mixed"])
    ap.add_argument("--pairs", type=int, default=128, help="preference pairs per shape")
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run both sides this many times (alternating); the best run counts")
    ap.add_argument("--avr-micro-bins", type=int, default=1)
    ap.add_argument("--share-prompt", choices=("auto", "false"), default="auto",
                    help="avr's data.share_prompt (auto: each pair's prompt computed once)")
    ap.add_argument("--trl-micro-pairs", type=int, default=1)
    ap.add_argument("--trl-venv", type=Path, default=REPO / ".venv-trl-bench")
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs and logs here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from avr_megatron.config import load_config
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.testing.toy_data import write_jsonl

    python = ensure_trl_venv(args.trl_venv)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="avr-vs-trl-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, model_dir = make_model(work, args)
    tok = AutoTokenizer.from_pretrained(model_dir)
    results: dict = {}
    for shape in args.shapes:
        pairs = make_pairs(tok, shape, args.pairs, args.seq_length)
        write_jsonl(pairs, work / f"pairs-{shape}.jsonl")
        cfg = load_config(str(REPO / "recipes" / "tiny_dpo.yaml"),
                          avr_overrides(args, work, shape, model_dir, tok_dir, 1, "precomputed"))
        td = load_training_data(cfg, "preference")  # the plan avr trains on (either way)
        pairs_per_bin = len(td.data) / td.plan.num_bins
        bins_per_step = max(1, round(args.pairs_per_step / pairs_per_bin))
        print(f"[{shape}] {len(td.data)} pairs in {td.plan.num_bins} bins "
              f"({td.plan.efficiency:.1%} real tokens): {bins_per_step} bins per step", flush=True)
        t0 = time.time()
        avr_runs, trl_runs = [], []
        for _ in range(args.repeats):  # alternate the sides so interference hits both alike
            avr_runs.append(run_avr(args, work, shape, model_dir, tok_dir, bins_per_step))
            trl_runs.append(run_trl(args, work, shape, model_dir, python))
        avr, trl = best_of(avr_runs), best_of(trl_runs)
        ours_lengths = sorted(int(x) for x in td.data.unit_lengths)
        results[shape] = {
            "pairs": len(td.data), "bins": td.plan.num_bins,
            "avr_bins_per_step": bins_per_step, "avr_packing_efficiency": td.plan.efficiency,
            "avr_share_prompt": args.share_prompt,
            "avr_computed_tokens": computed_tokens(td.data, args.share_prompt == "auto"),
            "useful_tokens": int(td.data.unit_lengths.sum()),
            "same_tokenisation": ours_lengths == sorted(trl.pop("pair_tokens")),
            "avr": avr, "trl": trl, "ratios": ratios(avr, trl), "wall_seconds": time.time() - t0}
        results[shape]["goals"] = goal_status(shape, results[shape]["ratios"])
        print(json.dumps(results[shape]["ratios"]), flush=True)

    rows = []
    for shape, r in results.items():
        for what in ("precomputed", "online"):
            rows.append({"shape": shape, "what": f"train, {what} reference",
                         "avr": r["avr"][what]["tokens_per_second"],
                         "trl": r["trl"][what]["tokens_per_second"], "unit": "useful tok/s",
                         "avr/trl": r["ratios"][f"train_{what}"],
                         "goal": GOALS.get(shape, {}).get(f"train_{what}")})
        rows.append({"shape": shape, "what": "reference pass", "unit": "seconds",
                     "avr": r["avr"]["reference_pass"]["seconds"],
                     "trl": r["trl"]["reference_pass"]["seconds"],
                     "avr/trl": r["ratios"]["reference_pass"],
                     "goal": GOALS.get(shape, {}).get("reference_pass")})
    print(f"\n{args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads / "
          f"{args.kv_heads} KV groups, vocab {args.vocab}, {args.seq_length}-token bins, "
          f"{args.pairs_per_step} pairs per step, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.threads} threads; avr/trl > 1 means avr is faster (reference pass: by time)")
    print(table(rows, ["shape", "what", "unit", "avr", "trl", "avr/trl", "goal"]))
    for shape, r in results.items():
        losses = {f"{side}_{m}": r[side][m]["first_loss"] for side in ("avr", "trl")
                  for m in ("precomputed", "online")}
        print(f"[{shape}] step-1 loss (log 2 = {math.log(2):.4f}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
              + f"; same tokenisation: {r['same_tokenisation']}; avr packing "
              f"{r['avr_packing_efficiency']:.1%} real, TRL rows "
              f"{r['trl']['precomputed']['real_fraction']:.1%} real; avr computes "
              f"{r['avr_computed_tokens']:,} of {r['useful_tokens']:,} useful tokens "
              f"(data.share_prompt {r['avr_share_prompt']})")
    write("dpo_vs_trl", {
        "commit": _commit(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("trl_venv", "workdir")},
        "shapes": results, "goals": GOALS})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
