"""`avr pairs stage1|stage2`: the SFT and preference datasets built from finished synthesis output.

stage1: <data_dir>/stage1/sft (RSFT conversations, plus the source set's chosen conversations
        with synth.pairs.mix_source_chosen; shuffled with run.seed) and <data_dir>/stage1/preference
        (response, criticism and improvement pairs under synth.pairs.gating).
stage2: <data_dir>/stage2/sft (long-thought SFT examples from the stage-2 searches) and, once
        `avr synth thoughts` has run with the thought-SFT model, <data_dir>/stage2/preference
        (best-vs-worst thought pairs with length control).
Every dataset is de-duplicated over the whole output (all shards and chunks); the summary counts
the copies removed. Each dataset is one file written atomically (`train.parquet` or `train.jsonl`) that
`datasets.load_dataset` reads; the run summary is saved beside them as summary.json.
With synth.pairs.valid_fraction > 0, the records of a held-out share of prompts go to a sibling
validation split instead (<dataset>_valid/validation.<ext>, see `split_held_out`), which
`avr pipeline` gives its training stages as data.valid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig
from avr_megatron.method.records import COLUMN_TYPES, PREFERENCE_COLUMNS, SFT_COLUMNS
from avr_megatron.synth.driver import print_report, pass_dir
from avr_megatron.synth.passes import build_stage1, build_stage2
from avr_megatron.runtime.files import atomic_write_json
from avr_megatron.synth.store import read_output, write_rows


def data_root(cfg: AvrConfig) -> Path:
    return Path(cfg.synth.data_dir or Path(cfg.run.dir) / "data")


def record_schema(columns):
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "messages": messages}
    return pa.schema([(c, types[COLUMN_TYPES[c]]) for c in columns])


def valid_dir(dataset: Path) -> Path:
    """Where the held-out split of a dataset directory goes (synth.pairs.valid_fraction): a
    sibling, since a directory given as data.train is read whole, recursively."""
    return dataset.with_name(dataset.name + "_valid")


def held_out_prompts(prompt_ids, fraction: float, seed: int) -> set[str]:
    """The prompts to hold out: round(fraction x prompts) of them (at least one when fraction > 0,
    never all), those with the smallest hash of (seed, prompt_id), so the same prompts are held
    out of every dataset built from one prompt set and seed."""
    ids = sorted(set(prompt_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    import hashlib

    def unit(prompt_id: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{prompt_id}".encode()).digest()

    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=unit)[:count])


def split_held_out(records: list[dict[str, Any]], held: set[str]):
    """(train, valid): every record of a held-out prompt goes to valid."""
    return ([r for r in records if r["prompt_id"] not in held],
            [r for r in records if r["prompt_id"] in held])


def _write_split(directory: Path, records: list[dict[str, Any]], columns, fmt: str,
                 card: tuple[str, str, AvrConfig, Any, Path], written: dict[str, Any], name: str,
                 held: set[str]) -> None:
    """Write the dataset (and with synth.pairs.valid_fraction its held-out split) into `written`."""
    cfg = card[2]
    train, valid = split_held_out(records, held)
    written[name] = {"rows": len(train), "path": str(_write(directory, train, columns, fmt, card))}
    if cfg.synth.pairs.valid_fraction > 0:
        title, description, *rest = card
        held = (f"{title} (validation split)", f"{description} Held-out prompts "
                f"(synth.pairs.valid_fraction={cfg.synth.pairs.valid_fraction}): no prompt here is in the "
                f"training split `{directory.name}`.", *rest)
        written[f"{name}_valid"] = {"rows": len(valid), "path": str(_write(
            valid_dir(directory), valid, columns, fmt, held, stem="validation"))}


def _write(directory: Path, records: list[dict[str, Any]], columns, fmt: str,
           card: tuple[str, str, AvrConfig, Any, Path] | None = None, stem: str = "train") -> Path:
    """Write the dataset file, and its dataset card (title, description, cfg, run summary,
    synthesis output it was built from) beside it."""
    ext = "parquet" if fmt == "parquet" else "jsonl"
    path = directory / f"{stem}.{ext}"
    write_rows(path, records, record_schema(columns), fmt)
    if card is not None:
        _card(directory, path, records, columns, *card)
    return path


def _card(directory: Path, path: Path, records: list[dict[str, Any]], columns, title: str,
          description: str, cfg: AvrConfig, summary, source: Path) -> None:
    from collections import Counter

    from avr_megatron.data.dataset_card import write_dataset_card

    from avr_megatron.synth.card import short_name

    kinds = Counter(r.get("pair_type") or r.get("kind") for r in records)
    manifests = sorted(source.glob("manifest-*.json"))
    manifest = json.loads(manifests[0].read_text()) if manifests else {}
    synth_fp, made_by = manifest.get("fingerprint_sha256"), manifest.get("fingerprint", {})
    s = cfg.synth

    def name(role: str) -> str | None:
        """The model that made the synthesis output (its manifest), else this recipe's."""
        engine = getattr(s, role)
        return short_name(made_by.get(role) or engine.name or engine.model)

    write_dataset_card(
        directory, [path], title=title, description=description, rows=len(records),
        columns=columns, tags=["preference" if "chosen" in columns else "sft"],
        provenance={"written by": "avr-megatron `avr pairs`",
                    "records by type": dict(sorted(kinds.items(), key=str)),
                    "policy model": name("policy"), "reward model": name("reward"),
                    "prompts": Path(s.input.path).name if s.input.path else None,
                    "run.seed": cfg.run.seed,
                    "synth.pairs.gating": s.pairs.gating,
                    "synth.pairs.mix_source_chosen": s.pairs.mix_source_chosen,
                    "synthesis output": f"`avr synth {source.name}`, configuration fingerprint (sha256) {synth_fp}",
                    "candidates accepted / rejected by rule (whole run)": summary.acceptance(),
                    "duplicates removed": summary.duplicates_removed or None})


def _finish(kind: str, directory: Path, summary, written: dict[str, Any], **extra: Any) -> dict[str, Any]:
    report = {"kind": f"pairs {kind}", "shard": "all shards", "outputs": written, **extra,
              "summary": summary.to_dict(), "report": summary.report()}
    atomic_write_json(directory / "summary.json", report)
    print_report(report)
    for name, info in written.items():
        print(f"{name}: {info['rows']} records -> {info['path']}")
    return report


def pairs_stage1(cfg: AvrConfig) -> dict[str, Any]:
    source = pass_dir(cfg, "stage1")
    rows = read_output(source, what="stage-1 output")
    mix = cfg.synth.pairs.mix_source_chosen
    if mix and not any(r.get("source_chosen") for r in rows):
        raise ConfigError("synth.pairs.mix_source_chosen=true, but the stage-1 output holds no source chosen "
                          "conversations: set synth.input.fields.chosen when running `avr synth stage1`")
    summary, sft, pairs = build_stage1(rows, cfg, mix_source_chosen=mix)
    held = held_out_prompts((r["prompt_id"] for r in rows), cfg.synth.pairs.valid_fraction, cfg.run.seed)
    out = data_root(cfg) / "stage1"
    fmt = cfg.synth.output_format
    written: dict[str, Any] = {}
    _write_split(out / "sft", sft, SFT_COLUMNS, fmt, (
        "AvR stage-1 RSFT conversations",
        "Supervised fine-tuning (RSFT) conversations built from AvR stage-1 refinement "
        "trees; `messages` ends with the assistant turn to learn.", cfg, summary, source), written, "sft", held)
    _write_split(out / "preference", pairs, PREFERENCE_COLUMNS, fmt, (
        "AvR stage-1 preference pairs",
        "Response, criticism and improvement preference pairs from AvR stage-1 refinement "
        "trees, in TRL's conversational format, with refinement-aware rewards "
        "(`reward_gap` = reward_chosen - reward_rejected).", cfg, summary, source), written, "preference", held)
    return _finish("stage1", out, summary, written, pair_rules=cfg.synth.pairs.gating)


def pairs_stage2(cfg: AvrConfig) -> dict[str, Any]:
    source = pass_dir(cfg, "stage2")
    search_rows = read_output(source, what="stage-2 output")
    thoughts_dir = pass_dir(cfg, "thoughts")
    have_thoughts = any(thoughts_dir.glob("manifest-*.json"))
    thought_rows = read_output(thoughts_dir, what="thought samples") if have_thoughts else []
    summary, sft, pairs = build_stage2(search_rows, thought_rows, cfg)
    held = held_out_prompts((r["prompt_id"] for r in search_rows), cfg.synth.pairs.valid_fraction,
                            cfg.run.seed)
    out = data_root(cfg) / "stage2"
    fmt = cfg.synth.output_format
    written: dict[str, Any] = {}
    _write_split(out / "sft", sft, SFT_COLUMNS, fmt, (
        "AvR stage-2 long-thought SFT examples",
        "Long refinement thoughts (answer, criticisms, improvements, final answer) written out "
        "from AvR stage-2 refinement searches, as SFT conversations.", cfg, summary, source), written, "sft", held)
    if have_thoughts:
        _write_split(out / "preference", pairs, PREFERENCE_COLUMNS, fmt, (
            "AvR stage-2 thought preference pairs",
            "Best-vs-worst sampled long thoughts of the thought-SFT model (length-controlled unless "
            "synth.thoughts.length_control is off), in TRL's conversational format.", cfg, summary,
            thoughts_dir), written, "preference", held)
    else:
        print(f"no thought samples in {thoughts_dir}: thought pairs need `avr synth thoughts` with the thought-SFT "
              "model (synth.policy.model); wrote the thought SFT data only")
    return _finish("stage2", out, summary, written)
