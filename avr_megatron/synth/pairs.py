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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig
from avr_megatron.method.records import COLUMN_TYPES, PREFERENCE_COLUMNS, SFT_COLUMNS
from avr_megatron.synth.driver import print_report, stage_dir
from avr_megatron.synth.stages import build_stage1, build_stage2
from avr_megatron.synth.store import atomic_write_json, read_output, write_rows


def data_root(cfg: AvrConfig) -> Path:
    return Path(cfg.synth.data_dir or Path(cfg.run.dir) / "data")


def record_schema(columns):
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "messages": messages}
    return pa.schema([(c, types[COLUMN_TYPES[c]]) for c in columns])


def _write(directory: Path, records: list[dict[str, Any]], columns, fmt: str) -> Path:
    ext = "parquet" if fmt == "parquet" else "jsonl"
    path = directory / f"train.{ext}"
    write_rows(path, records, record_schema(columns), fmt)
    return path


def _finish(kind: str, directory: Path, summary, written: dict[str, Any], **extra: Any) -> dict[str, Any]:
    report = {"kind": f"pairs {kind}", "shard": "all shards", "outputs": written, **extra,
              "summary": summary.to_dict(), "report": summary.report()}
    atomic_write_json(directory / "summary.json", report)
    print_report(report)
    for name, info in written.items():
        print(f"{name}: {info['rows']} records -> {info['path']}")
    return report


def pairs_stage1(cfg: AvrConfig) -> dict[str, Any]:
    rows = read_output(stage_dir(cfg, "stage1"), what="stage-1 output")
    mix = cfg.synth.pairs.mix_source_chosen
    if mix and not any(r.get("source_chosen") for r in rows):
        raise ConfigError("synth.pairs.mix_source_chosen=true, but the stage-1 output holds no source chosen "
                          "conversations: set synth.input.fields.chosen when running `avr synth stage1`")
    summary, sft, pairs = build_stage1(rows, cfg, mix_source_chosen=mix)
    out = data_root(cfg) / "stage1"
    fmt = cfg.synth.output_format
    written = {
        "sft": {"rows": len(sft), "path": str(_write(out / "sft", sft, SFT_COLUMNS, fmt))},
        "preference": {"rows": len(pairs), "path": str(_write(out / "preference", pairs, PREFERENCE_COLUMNS, fmt))},
    }
    return _finish("stage1", out, summary, written, pair_rules=cfg.synth.pairs.gating)


def pairs_stage2(cfg: AvrConfig) -> dict[str, Any]:
    search_rows = read_output(stage_dir(cfg, "stage2"), what="stage-2 output")
    thoughts_dir = stage_dir(cfg, "thoughts")
    have_thoughts = any(thoughts_dir.glob("manifest-*.json"))
    thought_rows = read_output(thoughts_dir, what="thought samples") if have_thoughts else []
    summary, sft, pairs = build_stage2(search_rows, thought_rows, cfg)
    out = data_root(cfg) / "stage2"
    fmt = cfg.synth.output_format
    written = {"sft": {"rows": len(sft), "path": str(_write(out / "sft", sft, SFT_COLUMNS, fmt))}}
    if have_thoughts:
        written["preference"] = {"rows": len(pairs),
                                 "path": str(_write(out / "preference", pairs, PREFERENCE_COLUMNS, fmt))}
    else:
        print(f"no thought samples in {thoughts_dir}: thought pairs need `avr synth thoughts` with the thought-SFT "
              "model (synth.policy.model); wrote the thought SFT data only")
    return _finish("stage2", out, summary, written)
