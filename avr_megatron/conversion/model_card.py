"""The model card (README.md) of a Hugging Face export: where the weights come from.

Written from the checkpoint alone (its recipe, config.yaml, and its avr_checkpoint.json state),
so `avr convert mcore-to-hf` and `checkpoint.export_hf` at the end of training give the same
card: the stage and iteration, the base model it started from (and, for DPO, the reference
model), the data it was trained and validated on with their fingerprints, the tokenizer's
fingerprint, the key hyper-parameters and the last validation metrics, and the whole resolved
recipe at the end. The YAML front matter follows the Hugging Face model-card metadata
(library_name, base_model, tags).
"""

from __future__ import annotations

from pathlib import Path

STAGES = {"sft": "supervised fine-tuning (`avr train sft`)",
          "dpo": "preference optimisation (`avr train dpo`)"}


def _base(init) -> tuple[str, str | None]:
    """(description, Hugging Face base_model value or None)."""
    if init.hf:
        return f"Hugging Face model `{init.hf}`", Path(init.hf).name
    if init.mcore:
        return f"Megatron checkpoint `{init.mcore}`", None
    return "random initialisation (run.seed)", None


def _rows(pairs) -> list[str]:
    return ["| " + " | ".join(str(c) for c in row) + " |" for row in pairs]


def model_card(cfg, meta: dict, ckpt_dir: Path, recipe: str = "") -> str:
    state = meta.get("state") or {}
    lineage = state.get("lineage") or {}
    stage = state.get("stage")
    base_text, base_model = _base(cfg.model.init_from)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- avr-megatron", "- alignment-via-refinement"]
    if stage:
        front.append(f"- {stage}")
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    title = cfg.run.name if cfg.run.name and cfg.run.name != "avr" else Path(cfg.run.dir).name
    lines = front + ["", f"# {title}", ""]
    if stage:
        lines.append(f"Trained by avr-megatron, {STAGES.get(stage, stage)}: iteration "
                     f"{meta.get('iteration')} of {lineage.get('train_iters', '?')}, exported "
                     f"from `{ckpt_dir}`.")
    else:
        lines.append(f"Exported by avr-megatron from `{ckpt_dir}` (iteration "
                     f"{meta.get('iteration')}; not a training checkpoint of ours, e.g. a "
                     "converted Hugging Face model).")
    lines += ["", "## Lineage", "", "| | |", "|---|---|"]
    rows = [("stage", stage or "none"), ("base model", base_text)]
    if stage == "dpo":
        ref = cfg.logps.reference
        ref_text = _base(ref)[0] if (ref.hf or ref.mcore) else "the base model"
        rows.append(("reference model", f"{ref_text} ({cfg.loss.reference} log-probs)"))
    for split in ("train", "valid"):
        path = getattr(cfg.data, split)
        info = lineage.get(split)
        if path is None:
            continue
        text = f"`{path}`"
        if info:
            text += (f": {info['examples']} examples, {info['tokens']} tokens; files "
                     f"fingerprint `{info['files_fingerprint']}`, examples fingerprint "
                     f"`{info['examples_fingerprint']}`")
        rows.append((f"{split} data", text))
    if lineage.get("tokenizer_fingerprint"):
        rows.append(("tokenizer", f"fingerprint `{lineage['tokenizer_fingerprint']}` "
                                  f"(`{cfg.data.tokenizer or cfg.model.init_from.hf}`)"))
    lines += _rows(rows)
    t, o, s = cfg.train, cfg.optimizer, cfg.scheduler
    hp = [("train.seq_length", t.seq_length), ("train.global_batch_size", t.global_batch_size),
          ("train.train_iters", lineage.get("train_iters", t.train_iters)),
          ("data.num_epochs", cfg.data.num_epochs), ("data.pack", cfg.data.pack),
          ("data.overlong", cfg.data.overlong),
          ("optimizer", f"{o.name}, lr {o.lr} -> {o.min_lr}, weight decay {o.weight_decay}, "
                        f"clip {o.clip_grad}"),
          ("scheduler", f"{s.decay_style}, warmup {s.warmup_iters}"),
          ("precision", "fp8 " + cfg.precision.fp8 if cfg.precision.fp8
           else ("bf16" if cfg.precision.bf16 else "fp32")),
          ("parallel", f"TP {cfg.parallel.tensor_model_parallel_size}, PP "
                       f"{cfg.parallel.pipeline_model_parallel_size}"),
          ("run.seed", cfg.run.seed)]
    if stage == "sft":
        hp.append(("data.sft_loss_on", cfg.data.sft_loss_on))
    if stage == "dpo":
        lo = cfg.loss
        hp += [("loss", f"{lo.type}, beta {lo.beta}, label_smoothing {lo.label_smoothing}, "
                        f"sft_weight {lo.sft_weight}, length_normalize {lo.length_normalize}"),
               ("loss.reward_gap", f"{lo.reward_gap} (scale {lo.reward_gap_scale})")]
    lines += ["", "## Hyper-parameters", "", "| key | value |", "|---|---|"] + _rows(hp)
    metrics = lineage.get("eval")
    if metrics:
        lines += ["", "## Validation (last evaluation)", "", "| metric | value |", "|---|---|"]
        lines += _rows((k, f"{v:.6g}") for k, v in metrics.items()
                       if isinstance(v, (int, float)) and k != "eval/seconds")
    lines += ["", "The base model's own card, when it had one, is `BASE_MODEL_README.md`.", "",
              "<details><summary>The training recipe (resolved)</summary>", "", "```yaml",
              recipe.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def write_model_card(out: Path, ckpt_dir: Path, assets: Path | None) -> None:
    """README.md (the card, ending with the resolved recipe) and BASE_MODEL_README.md (the base
    model's card, if the checkpoint's assets had one) into the export directory `out`. Cards
    name paths, so content fingerprints (data/fingerprint.py) leave Markdown files out."""
    import shutil

    from avr_megatron.checkpoint.dist_ckpt import CONFIG_FILE, read_config, read_meta

    if assets is not None and (assets / "README.md").is_file():
        shutil.copy2(assets / "README.md", out / "BASE_MODEL_README.md")
    cfg = read_config(ckpt_dir)
    recipe = (ckpt_dir / CONFIG_FILE).read_text()
    (out / "README.md").write_text(model_card(cfg, read_meta(ckpt_dir), ckpt_dir, recipe))
