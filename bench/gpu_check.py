"""GPU check: the code paths that only run on a GPU, exercised on one GPU in a few minutes.

Run through `bench/gpu_check.sh` (it installs the wheels and sets the paths); writes
bench/results/gpu_check.json with one entry per check (ok / failed with the error / skipped with
the reason) and the figures each produced.

    local_vs_cpu    the local-spec model on CUDA/NCCL, fp32 and bf16, against the same weights
                    run on the CPU (gloo) in a subprocess with CUDA hidden
    smoke           `avr smoke` (the CLI, in a subprocess) on the GPU: loss falls
    steps_local     one SFT and one DPO step (online reference) on the local spec: tokens/s,
                    model TFLOP/s, MFU
    te_keys         the Transformer Engine spec's dist-checkpoint keys equal the local spec's plus
                    testing/te_layout.TE_ONLY_OBJECTS (what the converter writes)
    te_load_local   a local-spec checkpoint (no final-norm extra state) loads into the TE spec;
                    logits close to the local spec's
    steps_te_bf16   SFT and DPO steps on the TE spec (THD packed sequences) in bf16
    steps_te_fp8    the same in FP8 (hybrid, delayed scaling; the DPO reference in bf16)
    te_fp8_resume   FP8 SFT steps of a small model, save, resume in a fresh model: the FP8
                    scales come back (vetted extra state) and the next loss matches
    fp8_rules       config.validate.fp8_device_problem against TE's own support checks; mxfp8 is
                    refused on Hopper before any work

`--cpu` runs the same script on a machine without a GPU with tiny shapes (the GPU/TE checks are
skipped with their reason): tests/bench/test_gpu_check.py runs it in CI in an environment made
of torch, its dependencies and bench/gpu_check_requirements.txt only, as on the GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

# ------------------------------------------------------------------------------------------
# Shapes

def shapes(cpu: bool) -> dict:
    """Model and batch shapes: tiny on CPU; on the GPU a ~1.2B Llama-3.2-1B-shaped model at
    4096 tokens per microbatch for the timed steps."""
    small = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=704",
             "model.num_attention_heads=8", "model.num_query_groups=4", "model.vocab_size=1000",
             "model.make_vocab_size_divisible_by=128"]
    if cpu:
        return {"check": small, "check_seq": 128, "perf": small, "perf_seq": 256,
                "perf_gbs": 2, "steps": 2}
    return {"check": small, "check_seq": 512, "perf": ["model.preset=llama3.2-1b"],
            "perf_seq": 4096, "perf_gbs": 8, "steps": 3}


def make_cfg(overrides: list[str], run_dir: str):
    from avr_megatron.config import load_config

    return load_config(None, [f"run.dir={run_dir}", "model.max_position_embeddings=8192",
                              "logging.tensorboard=false", "logging.progress_bar=false",
                              "scheduler.warmup_iters=0", "optimizer.lr=1e-4", *overrides])


def synthetic_batch(vocab: int, length: int, bins: int, pairs: bool, seed: int):
    """A packed microbatch (data.batches.PackedBatch) of random tokens: each bin holds several
    sequences (SFT) or chosen/rejected pairs (DPO) with trained tokens in their second half."""
    import torch

    from avr_megatron.data.batches import PackedBatch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bins, length), generator=g)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    positions = torch.zeros_like(tokens)
    segment = torch.full_like(tokens, -1)
    unit, role, targets, chosen, rejected = [], [], [], [], []
    per_bin = 4
    seq_len = length // per_bin - 8  # some padding at the end of each bin
    for b in range(bins):
        for k in range(per_bin):
            s = len(unit)
            a, e = k * (length // per_bin), k * (length // per_bin) + seq_len
            labels[b, a:e - 1] = tokens[b, a + 1:e]
            mask[b, a + seq_len // 2:e - 1] = True
            positions[b, a:e] = torch.arange(seq_len)
            segment[b, a:e] = s
            unit.append(b * per_bin + k if not pairs else (b * per_bin + k) // 2)
            role.append(k % 2 if pairs else 0)
            targets.append(int(mask[b, a:e].sum()))
            (chosen if k % 2 == 0 else rejected).append(s)
    batch = PackedBatch(tokens=tokens, labels=labels, loss_mask=mask, position_ids=positions,
                        segment=segment, seq_unit=torch.tensor(unit), seq_role=torch.tensor(role),
                        seq_targets=torch.tensor(targets))
    if pairs:
        batch.pair_chosen, batch.pair_rejected = torch.tensor(chosen), torch.tensor(rejected)
        batch.reward_gap = torch.full((len(chosen),), 1.0, dtype=torch.float64)
    return batch


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# Checks

def _logits(chunks, batch, use_te: bool, bf16: bool):
    import torch

    from avr_megatron.training.losses.common import packed_forward

    with torch.no_grad():
        out = packed_forward(chunks[0], batch, use_te=use_te, bf16=bf16)
    return out.float().reshape(-1, out.shape[-1]).cpu()


def cpu_reference(out: Path, cpu: bool) -> None:
    """Subprocess with CUDA hidden: weights, a batch and the local spec's fp32 CPU logits."""
    import torch

    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full
    from avr_megatron.runtime.distributed import initialize, shutdown

    sh = shapes(cpu)
    cfg = make_cfg(sh["check"] + ["model.transformer_impl=local"], str(out.parent / "cpu_ref"))
    initialize(cfg)
    chunks = build_model(cfg)
    batch = synthetic_batch(cfg.model.vocab_size, sh["check_seq"], 2, False, seed=1)
    torch.save({"weights": gather_full(chunks, False), "batch": batch.__dict__,
                "logits": _logits(chunks, batch, use_te=False, bf16=False)}, out)
    shutdown()


def check_local_vs_cpu(ctx) -> dict:
    import torch
    import torch.distributed as dist

    from avr_megatron.data.batches import PackedBatch
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import load_full_state_dict
    from avr_megatron.runtime.distributed import initialize

    ref_file = ctx.work / "cpu_reference.pt"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, __file__, "cpu-reference", "--out", str(ref_file),
                    *(["--cpu"] if ctx.cpu else [])], check=True, env=env, timeout=300)
    ref = torch.load(ref_file, weights_only=True)
    batch = PackedBatch(**ref["batch"])
    out = {"backend": None}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        cfg = make_cfg(shapes(ctx.cpu)["check"] + ["model.transformer_impl=local",
                                                   f"precision.bf16={str(bf16).lower()}"],
                       str(ctx.work / "local"))
        initialize(cfg)
        out["backend"] = dist.get_backend()
        chunks = build_model(cfg)
        load_full_state_dict(chunks, ref["weights"], False)
        logits = _logits(chunks, batch, use_te=False, bf16=bf16)
        vocab = cfg.model.vocab_size
        diff = (logits[:, :vocab] - ref["logits"][:, :vocab]).abs()
        lp = torch.log_softmax(logits[:, :vocab], -1) - torch.log_softmax(
            ref["logits"][:, :vocab], -1)
        out[precision] = {"max_abs_logit_diff": diff.max().item(),
                          "max_abs_logprob_diff": lp.abs().max().item(),
                          "logit_scale": ref["logits"].abs().max().item()}
        del chunks
        free_memory()
    out["ok"] = (out["fp32"]["max_abs_logit_diff"] < 1e-3
                 and out["bf16"]["max_abs_logprob_diff"] < 0.1)
    out["tolerances"] = "fp32 logits 1e-3, bf16 log-probs 0.1 (absolute)"
    return out


def check_smoke(ctx) -> dict:
    run_dir = ctx.work / "smoke"
    cmd = [sys.executable, __file__, "avr", "smoke", "--recipe", str(ROOT / "recipes/tiny.yaml"),
           f"run.dir={run_dir}", "logging.progress_bar=false",
           f"train.train_iters={6 if ctx.cpu else 30}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"avr smoke exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    s = json.loads((run_dir / "smoke_summary.json").read_text())
    return {"ok": s["last_loss"] < s["first_loss"], "first_loss": s["first_loss"],
            "last_loss": s["last_loss"], "tokens_per_second": s["tokens_per_second"]}


def _timed_steps(cfg, objective_name: str, use_te: bool, steps: int, seq: int, gbs: int,
                 chunks=None, optimizer=None, scheduler=None, start_step: int = 0) -> dict:
    """Run `steps` training steps of the SFT or DPO objective on synthetic packed batches
    (same batches for every run with the same start_step); time all but the first."""
    import torch

    from avr_megatron.models.llama import build_model, unwrap
    from avr_megatron.runtime.device import device
    from avr_megatron.config.layout import layout_for
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.training.flops import forward_flops, peak_flops
    from avr_megatron.training.losses.common import SequenceLogprobs
    from avr_megatron.training.losses.preference import PreferenceObjective
    from avr_megatron.training.losses.sft import SFTObjective
    from avr_megatron.training.reference import OnlineReference, build_reference_model
    from avr_megatron.training.setup import (
        build_optimizer,
        build_scheduler,
        num_microbatches,
        wrap_ddp,
    )
    from avr_megatron.training.step import train_step

    m = cfg.model
    bf16 = cfg.precision.bf16
    if chunks is None:  # a new run: process groups for this layout, then the model
        initialize(cfg)
        chunks = build_model(cfg)
        for c in chunks:
            unwrap(c).config.calculate_per_token_loss = True
        chunks = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(chunks, cfg)
        scheduler = build_scheduler(optimizer, cfg)
    ref_factor = 0.0
    if objective_name == "sft":
        objective = SFTObjective(vocab_size=m.vocab_size, use_te=use_te, bf16=bf16)
    else:
        ref = build_reference_model(cfg)
        reference = OnlineReference(ref, SequenceLogprobs(m.vocab_size, 0).sequences,
                                    use_te=use_te, bf16=bf16, seq_length=seq,
                                    bins_per_microbatch=1)
        objective = PreferenceObjective(cfg.loss, vocab_size=m.vocab_size, use_te=use_te,
                                        bf16=bf16, reference=reference)
        ref_factor = reference.flops_factor
    import torch.distributed as dist

    n_mb = num_microbatches(cfg, layout_for(cfg, dist.get_world_size()))
    losses, times, tokens, flops = [], [], 0, 0.0
    for step in range(start_step, start_step + steps):
        batches = [synthetic_batch(m.vocab_size, seq, 1, objective_name == "dpo",
                                   seed=1000 * step + i) for i in range(n_mb)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()  # as the trainer times a step: reference pass included
        objective.prepare(batches)
        result = train_step(objective.forward_step, batches, chunks, optimizer, scheduler,
                            seq_length=seq, micro_batch_size=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        losses.append(result.metrics["loss"])
        if step > start_step or steps == 1:
            real = sum(b.real_tokens() for b in batches)
            lengths = [int((b.segment == s).sum()) for b in batches
                       for s in range(b.num_sequences)]
            times.append(seconds)
            tokens += real
            flops += forward_flops(m, real, sum(x * x for x in lengths)) * (3 + 3 * ref_factor)
    seconds = sum(times)
    peak = peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      cfg.precision.fp8 is not None, None)
    result = {"losses": losses, "step_seconds": seconds / len(times),
              "tokens_per_second": tokens / seconds, "model_tflops": flops / seconds / 1e12,
              "mfu": (flops / seconds / peak) if peak else None,
              "device": str(device()), "tokens_per_step": tokens / len(times)}
    result["_state"] = (chunks, optimizer, scheduler)
    return result


def _steps(ctx, spec: list[str], use_te: bool, extra: list[str] = ()) -> dict:
    sh = shapes(ctx.cpu)
    out = {}
    for objective in ("sft", "dpo"):
        cfg = make_cfg(sh["perf"] + spec + [f"train.seq_length={sh['perf_seq']}",
                                            "train.micro_batch_size=1",
                                            f"train.global_batch_size={sh['perf_gbs']}",
                                            *extra], str(ctx.work / f"steps_{objective}"))
        r = _timed_steps(cfg, objective, use_te, sh["steps"], sh["perf_seq"], sh["perf_gbs"])
        r.pop("_state")
        out[objective] = r
        free_memory()
    out["ok"] = all(math.isfinite(out[o]["losses"][-1]) for o in ("sft", "dpo"))
    return out


def check_steps_local(ctx) -> dict:
    return _steps(ctx, ["model.transformer_impl=local", f"precision.bf16={ctx.bf16}"], False)


def _needs_te(ctx) -> str | None:
    from avr_megatron.models.llama import transformer_engine_status

    ok, reason = transformer_engine_status()
    return None if ok else reason


def check_te_keys(ctx) -> dict:
    from avr_megatron.models.llama import build_model, unwrap
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.testing.te_layout import TE_ONLY_OBJECTS

    keys = {}
    for impl in ("local", "transformer_engine"):
        cfg = make_cfg(shapes(ctx.cpu)["check"] + [f"model.transformer_impl={impl}",
                                                   "precision.bf16=true"], str(ctx.work / "keys"))
        initialize(cfg)
        sd = unwrap(build_model(cfg)[0]).sharded_state_dict()
        keys[impl] = {getattr(v, "key", k) for k, v in sd.items()}
        free_memory()
    # With TE installed the local spec's final norm is TENorm too (transformer_block.py).
    local = keys["local"] | set(TE_ONLY_OBJECTS)
    te = keys["transformer_engine"]
    return {"ok": te == local, "te_only": sorted(te - local), "local_only": sorted(local - te)}


def check_te_load_local(ctx) -> dict:
    import torch

    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import initialize

    logits = {}
    for impl in ("local", "transformer_engine"):
        cfg = make_cfg(shapes(ctx.cpu)["check"] + [f"model.transformer_impl={impl}",
                                                   "precision.bf16=true"], str(ctx.work / "tl"))
        vocab = cfg.model.vocab_size
        batch = synthetic_batch(vocab, shapes(ctx.cpu)["check_seq"], 1, False, seed=3)
        initialize(cfg)
        chunks = build_model(cfg)
        if impl == "local":
            save_checkpoint(ctx.work / "tl" / "ckpt", 0, chunks, cfg)
        else:
            load_checkpoint(ctx.work / "tl" / "ckpt", chunks)
        logits[impl] = _logits(chunks, batch, use_te=impl != "local", bf16=True)
        del chunks
        free_memory()
    lp = {k: torch.log_softmax(v[:, :vocab], -1) for k, v in logits.items()}
    diff = (lp["local"] - lp["transformer_engine"]).abs().max().item()
    return {"ok": diff < 0.1, "max_abs_logprob_diff_bf16": diff}


def check_steps_te_bf16(ctx) -> dict:
    return _steps(ctx, ["model.transformer_impl=transformer_engine", "precision.bf16=true"], True)


FP8 = ["precision.bf16=true", "precision.fp8=hybrid", "precision.fp8_recipe=delayed",
       "precision.fp8_amax_history_len=16"]


def check_steps_te_fp8(ctx) -> dict:
    """FP8 SFT and DPO steps (the DPO reference runs in bf16: logps.fp8=false)."""
    return _steps(ctx, ["model.transformer_impl=transformer_engine", *FP8], True)


def _te_scales(chunks) -> dict:
    """Delayed-scaling FP8 scales of every TE module (module name -> forward scale)."""
    from avr_megatron.models.llama import unwrap

    out = {}
    for name, module in unwrap(chunks[0]).named_modules():
        meta = getattr(module, "fp8_meta", None)
        if isinstance(meta, dict) and "scaling_fwd" in meta:
            out[name] = meta["scaling_fwd"].scale.detach().float().cpu().clone()
    return out


def check_te_fp8_resume(ctx) -> dict:
    import torch

    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from avr_megatron.training.setup import params_synced

    # The small shape: a checkpoint with optimizer state of the 1B model would be ~17 GB.
    sh = shapes(ctx.cpu)
    seq, gbs = sh["check_seq"], 2
    cfg = make_cfg(sh["check"] + FP8 + ["model.transformer_impl=transformer_engine",
                                        f"train.seq_length={seq}", "train.micro_batch_size=1",
                                        f"train.global_batch_size={gbs}"], str(ctx.work / "fp8"))
    first = _timed_steps(cfg, "sft", True, 3, seq, gbs)
    chunks, optimizer, scheduler = first.pop("_state")
    with params_synced(chunks):  # as the trainer saves (ddp.overlap_param_gather)
        save_checkpoint(ctx.work / "fp8" / "ckpt", 3, chunks, cfg, optimizer=optimizer,
                        scheduler=scheduler)
    scales = _te_scales(chunks)
    uninterrupted = _timed_steps(cfg, "sft", True, 1, seq, gbs, chunks, optimizer, scheduler,
                                 start_step=3)
    uninterrupted.pop("_state")
    del chunks, optimizer, scheduler
    free_memory()
    # A fresh model, optimizer and scheduler resume from the checkpoint.
    from avr_megatron.models.llama import build_model, unwrap
    from avr_megatron.training.setup import build_optimizer, build_scheduler, wrap_ddp

    fresh = build_model(cfg)
    for c in fresh:
        unwrap(c).config.calculate_per_token_loss = True
    fresh = wrap_ddp(fresh, cfg)
    opt = build_optimizer(fresh, cfg)
    sched = build_scheduler(opt, cfg)
    unsafe_before = os.environ.get("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE")
    load_checkpoint(ctx.work / "fp8" / "ckpt", fresh, optimizer=opt, scheduler=sched)
    restored = _te_scales(fresh)
    resumed = _timed_steps(cfg, "sft", True, 1, seq, gbs, fresh, opt, sched, start_step=3)
    resumed.pop("_state")
    same_scales = scales.keys() == restored.keys() and len(scales) > 0 and all(
        torch.equal(scales[k], restored[k]) for k in scales)
    a, b = uninterrupted["losses"][0], resumed["losses"][0]
    return {"ok": same_scales and abs(a - b) <= 1e-3 * abs(a) and unsafe_before is None
            and "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE" not in os.environ,
            "fp8_modules": len(scales), "scales_restored": same_scales,
            "loss_after_resume": b, "loss_uninterrupted": a, "losses_before": first["losses"]}


def check_fp8_rules(ctx) -> dict:
    import torch

    from avr_megatron.config import ConfigError
    from avr_megatron.config.validate import fp8_device_problem
    from avr_megatron.models.llama import uses_transformer_engine

    try:
        from transformer_engine.pytorch import quantization as q
    except ImportError:  # TE < 2.x layout
        from transformer_engine.pytorch import fp8 as q
    te_checks = {"delayed": q.check_fp8_support, "tensorwise": q.check_fp8_support,
                 "blockwise": q.check_fp8_block_scaling_support, "mxfp8": q.check_mxfp8_support}
    cc = torch.cuda.get_device_capability()
    agree = {}
    for recipe, check in te_checks.items():
        te_ok = bool(check()[0])
        ours_ok = fp8_device_problem(recipe, cc, torch.version.cuda) is None
        agree[recipe] = {"te": te_ok, "ours": ours_ok}
    refused = None
    if cc < (10, 0):
        cfg = make_cfg(["precision.bf16=true", "precision.fp8=hybrid",
                        "precision.fp8_recipe=mxfp8"], str(ctx.work / "rules"))
        try:
            uses_transformer_engine(cfg)
            refused = False
        except ConfigError:
            refused = True
    return {"ok": all(v["te"] == v["ours"] for v in agree.values()) and refused is not False,
            "compute_capability": list(cc), "recipes": agree, "mxfp8_refused": refused}


CHECKS = [
    ("local_vs_cpu", check_local_vs_cpu, None),
    ("smoke", check_smoke, None),
    ("steps_local", check_steps_local, None),
    ("te_keys", check_te_keys, _needs_te),
    ("te_load_local", check_te_load_local, _needs_te),
    ("steps_te_bf16", check_steps_te_bf16, _needs_te),
    ("steps_te_fp8", check_steps_te_fp8, _needs_te),
    ("te_fp8_resume", check_te_fp8_resume, _needs_te),
    ("fp8_rules", check_fp8_rules, _needs_te),
]


class Context:
    def __init__(self, cpu: bool, work: Path):
        self.cpu, self.work = cpu, work
        self.bf16 = "false" if cpu else "true"


def environment() -> dict:
    import importlib.metadata as md

    import torch

    from avr_megatron.models.llama import (
        grad_accumulation_fusion_available,
        transformer_engine_status,
    )

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "megatron_core": version("megatron-core"),
            "transformer_engine": version("transformer-engine") or version("transformer_engine"),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "compute_capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "transformer_engine_status": transformer_engine_status()[1],
            "gradient_accumulation_fusion": grad_accumulation_fusion_available()}


def run_checks(cpu: bool, out: Path, only: list[str] | None) -> int:
    import torch

    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU dry run", file=sys.stderr)
        return 2
    ctx = Context(cpu, RESULTS / ".gpu_check_work")
    shutil.rmtree(ctx.work, ignore_errors=True)  # checkpoints of an earlier run
    ctx.work.mkdir(parents=True)
    report = {"benchmark": "gpu_check", "mode": "cpu" if cpu else "gpu",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
              "checks": {}}
    failed = 0
    for name, fn, needs in CHECKS:
        if only and name not in only:
            continue
        skip = needs(ctx) if needs else None
        if skip:
            report["checks"][name] = {"status": "skipped", "reason": skip}
            print(f"{name:15s} skipped: {skip}", flush=True)
            continue
        t0 = time.time()
        try:
            result = fn(ctx)
            status = "ok" if result.pop("ok") else "failed"
        except Exception as e:  # one check's failure must not hide the others' results
            result, status = {"error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-4000:]}, "failed"
        free_memory()
        failed += status == "failed"
        report["checks"][name] = {"status": status, "seconds": round(time.time() - t0, 1),
                                  **result}
        print(f"{name:15s} {status} ({time.time() - t0:.0f} s) "
              f"{json.dumps({k: v for k, v in result.items() if k != 'traceback'})[:300]}",
              flush=True)
        _write(out, report)  # partial results survive a timeout
    report["failed"] = failed
    _write(out, report)
    print(f"wrote {out}")
    return 1 if failed else 0


def _write(path: Path, report: dict) -> None:
    from avr_megatron.runtime.files import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2, default=str))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["avr"]:  # the avr CLI, under the same import rules
        from avr_megatron.cli.main import main as avr

        return avr(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="run", choices=["run", "cpu-reference"])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with tiny shapes")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    ap.add_argument("--only", nargs="*", help="run only these checks")
    args = ap.parse_args(argv)
    if args.what == "cpu-reference":
        # The CPU result as a machine without GPU packages computes it: Megatron takes its
        # no-TE, no-APEX paths (CUDA is hidden from this process by the caller).
        from avr_megatron.testing.import_block import block

        block("transformer_engine", "transformer_engine_torch", "apex",
              "fused_weight_gradient_mlp_cuda")
        cpu_reference(args.out, args.cpu)
        return 0
    return run_checks(args.cpu, args.out, args.only)


if __name__ == "__main__":
    sys.exit(main())
