"""The dataset card (README.md) of a finished synthesis output directory (`avr synth stage1|stage2|
thoughts`): what produced the rows, with which models, sampling and configuration fingerprint,
how many rows (by status), and which input records were skipped and why.

Everything comes from the directory itself (shard manifests and the merged summary), so the
card is the same whichever shard finishes last, and it names no absolute path: the same data
makes the same card. `datasets.load_dataset(<directory>)` still reads `data/train-*` (the card
has no `configs` section, see avr_megatron.data.dataset_card).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from avr_megatron.synth.store import output_parts

_TITLES = {
    "stage1": ("AvR stage-1 refinement trees",
               "One row per prompt: the first answer y0, k criticisms of it and m improvements per "
               "criticism, every node scored by the reward model (`tree` holds the JSON tree). Rows "
               "whose `status` is not `ok` are prompts that gave no tree (reason in `status`)."),
    "stage2": ("AvR stage-2 refinement searches",
               "One row per prompt: a multi-round refinement search (criticise, improve, keep the "
               "best) starting from y0, with per-round rewards (`search` holds the JSON search)."),
    "thoughts": ("AvR stage-2 sampled long thoughts",
                 "One row per prompt: long refinement thoughts sampled from the thought-SFT model, "
                 "each scored on its final answer; `avr pairs stage2` turns them into pairs."),
}
_SHOWN_SKIPPED = 50  # skipped records listed one by one; the rest are counted by reason


def short_name(name: Any) -> Any:
    """A model or file named by path -> its last component (no machine-specific paths)."""
    return Path(name).name if isinstance(name, str) and "/" in name else name


def _count_rows(parts: Sequence[Path]) -> tuple[int, Counter]:
    """Rows and rows by status, reading only the `status` column of each part."""
    statuses: Counter = Counter()
    for part in parts:
        if part.suffix == ".parquet":
            import pyarrow.parquet as pq

            statuses.update(pq.read_table(part, columns=["status"]).column("status").to_pylist())
        else:
            with open(part, encoding="utf-8") as f:
                statuses.update(json.loads(line).get("status") for line in f if line.strip())
    return sum(statuses.values()), statuses


def output_card_provenance(out: Path, merged: dict[str, Any]) -> dict[str, Any]:
    """The card's provenance table: from the first shard manifest (every shard agrees on the
    fingerprint; store.ShardStore.open refuses otherwise) and the merged summary."""
    manifest = json.loads(sorted(out.glob("manifest-*.json"))[0].read_text())
    fp = manifest["fingerprint"]
    source = fp.get("source", {})
    config = {k: fp[k] for k in ("k", "m", "max_rounds", "beam_width", "start", "max_rating_tries",
                                 "max_answer_tries", "rating_fallback", "rating_parse", "chunk_size",
                                 "num_shards", "output_format") if k in fp}
    report = merged.get("report", {})
    return {
        "written by": f"avr-megatron `avr synth {merged['kind']}`",
        "policy model": short_name(fp.get("policy")), "reward model": short_name(fp.get("reward")),
        "run.seed": fp.get("seed"), "sampling": fp.get("sampling"), "settings": config,
        "configuration fingerprint (sha256)": manifest.get("fingerprint_sha256"),
        "input": short_name(source.get("path")), "input digest": source.get("digest"),
        "input rows read": merged.get("rows_read"), "prompts synthesised": report.get("prompts"),
        "trees/searches": report.get("trees"), "failures by reason": report.get("failures") or None,
        "rating fallback": merged.get("rating_fallback"),
        "skipped input records": merged.get("invalid", {}).get("count", 0),
    }


def skipped_section(invalid: dict[str, Any]) -> list[str]:
    """Markdown lines: the skipped input records (row, id, field, reason), counted by field."""
    records = invalid.get("records") or []
    if not records:
        return ["## Skipped input records", "", "None: every input record was synthesised."]
    by_field = Counter(r.get("field") or "(whole record)" for r in records)
    lines = ["## Skipped input records", "",
             f"{len(records)} input record(s) were skipped (never sent to a model). By field:", ""]
    lines += [f"- {field}: {n}" for field, n in by_field.most_common()]
    lines += ["", "| row | id | field | reason |", "|---|---|---|---|"]
    for r in records[:_SHOWN_SKIPPED]:
        cells = [str(r.get(k) if r.get(k) is not None else "") for k in ("row", "id", "field", "reason")]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    if len(records) > _SHOWN_SKIPPED:
        lines.append(f"\n... and {len(records) - _SHOWN_SKIPPED} more (all listed in summary.json).")
    return lines


def write_output_card(out: Path, merged: dict[str, Any], columns: Sequence[str]) -> Path | None:
    """Write `out`/README.md for a complete output directory; None (nothing written) while shards
    are still missing."""
    if not merged.get("complete"):
        return None
    from avr_megatron.data.dataset_card import write_dataset_card

    kind = merged["kind"]
    parts = output_parts(out)
    rows, statuses = _count_rows(parts)
    title, description = _TITLES.get(kind, (f"AvR synthesis output ({kind})", "Synthesis rows."))
    provenance = {**output_card_provenance(out, merged),
                  "rows by status": dict(sorted(statuses.items(), key=str))}
    return write_dataset_card(out, parts, title=title, description=description, rows=rows,
                              columns=columns, provenance=provenance, tags=["synthetic", kind],
                              sections=skipped_section(merged.get("invalid", {})))
