"""TRL's side of bench/dpo_vs_trl.py: DPOTrainer on a Hugging Face model and a TRL
conversational preference file, timed per optimizer step. Runs in the benchmark's throwaway TRL
venv (TRL + accelerate on top of the project's own torch/transformers); imports nothing from
avr_megatron. Writes one JSON object to --out.

    python bench/trl_dpo_side.py --model DIR --data pairs.jsonl --out trl.json \
        --mode precomputed|online --pairs-per-step 8 --micro-pairs 2 --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--mode", choices=("precomputed", "online"), required=True)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--micro-pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    data = data.select_columns(["prompt", "chosen", "rejected"])

    accumulation = args.pairs_per_step // args.micro_pairs
    assert accumulation * args.micro_pairs == args.pairs_per_step, "micro-pairs must divide pairs"
    config = DPOConfig(
        output_dir=os.path.join(args.workdir, "trl_out"), use_cpu=True, seed=0,
        per_device_train_batch_size=args.micro_pairs, gradient_accumulation_steps=accumulation,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
        precompute_ref_log_probs=args.mode == "precomputed",
        precompute_ref_batch_size=args.micro_pairs, bf16=args.bf16,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False)

    # Reference pass: TRL's own precompute, timed around the method that runs it.
    timing = {"ref_pass_seconds": None}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):
        t0 = time.perf_counter()
        out = original(self, dataset, name, batch_size)
        timing["ref_pass_seconds"] = time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    steps: list[dict] = []
    tokens = {"real": 0, "padded": 0, "pairs": 0}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            now, cpu = time.perf_counter(), time.process_time()
            steps.append({"seconds": now - self.last, "cpu_seconds": cpu - self.last_cpu,
                          **tokens})
            tokens.update(real=0, padded=0, pairs=0)
            self.last, self.last_cpu = now, cpu

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs and steps:
                steps[-1].setdefault("loss", logs["loss"])

    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         callbacks=[StepTimer()])
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        mask = inputs["attention_mask"]
        tokens["real"] += int(mask.sum())
        tokens["padded"] += int(mask.numel())
        tokens["pairs"] += mask.shape[0] // 2
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    trainer.train()
    lengths = [len(x["prompt_ids"]) * 2 + len(x["chosen_ids"]) + len(x["rejected_ids"])
               for x in trainer.train_dataset]
    result = {"mode": args.mode, "steps": steps, "ref_pass_seconds": timing["ref_pass_seconds"],
              "pair_tokens": lengths, "threads": torch.get_num_threads(),
              "versions": {"trl": _version("trl"), "accelerate": _version("accelerate"),
                           "transformers": _version("transformers"), "torch": torch.__version__}}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
