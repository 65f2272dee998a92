"""Dataset cards: the README.md beside a dataset we write, saying what it holds and where it
came from.

The YAML front matter is Hugging Face's dataset-card metadata (pretty_name, tags). It
deliberately has no `configs` section: with one, `datasets` (5.x) keys its cache on the README
alone, not on the data files, and returns a stale cached copy after the data changes; without
it, `datasets.load_dataset(<directory>)` finds `train.*` itself, as before. The body lists the
columns, the record count, the file's content fingerprint and the provenance the writer passes
(stage, models, source data, rules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from avr_megatron.data.fingerprint import fingerprint_files

_SHOWN_FILES = 10  # a sharded output has a file per chunk: name the first few, count the rest


def dataset_card(title: str, description: str, data_files: Sequence[str], rows: int,
                 columns: Sequence[str], fingerprint: str, provenance: dict[str, Any],
                 tags: Sequence[str] = (), sections: Sequence[str] = ()) -> str:
    """The card's Markdown; `sections` are extra body lines after the provenance table."""
    shown = [f"`{f}`" for f in data_files[:_SHOWN_FILES]]
    if len(data_files) > _SHOWN_FILES:
        shown.append(f"... ({len(data_files)} files)")
    front = ["---", f"pretty_name: {json.dumps(title)}", "tags:", "- avr-megatron"]
    front += [f"- {t}" for t in tags] + ["---"]
    lines = front + ["", f"# {title}", "", description, "",
                     f"- records: {rows}", f"- files: {', '.join(shown)}",
                     f"- content fingerprint: `{fingerprint}` (avr_megatron.data.fingerprint)",
                     f"- columns: {', '.join(f'`{c}`' for c in columns)}", "", "## Provenance",
                     "", "| | |", "|---|---|"]
    for key, value in provenance.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"| {key} | {text.replace('|', '/')} |")
    lines += ["", *sections] if sections else []
    lines += ["", "Load with `datasets.load_dataset(\"<this directory>\")`.", ""]
    return "\n".join(lines)


def write_dataset_card(directory: Path, data_files: Sequence[Path], *, title: str,
                       description: str, rows: int, columns: Sequence[str],
                       provenance: dict[str, Any], tags: Sequence[str] = (),
                       sections: Sequence[str] = ()) -> Path:
    """Write `directory`/README.md (atomically) for the given data files (in directory)."""
    from avr_megatron.runtime import files

    names = [str(Path(f).relative_to(directory)) for f in data_files]
    card = dataset_card(title, description, names, rows, columns, fingerprint_files(data_files),
                        provenance, tags, sections)
    path = directory / "README.md"
    files.atomic_write_bytes(path, card.encode())
    return path
