"""`avr prepare`: tokenise data.train (and data.valid) once into the prepared, memory-mapped form
that `avr train` and `avr logps` map (see avr_megatron.data.prepare). Rerunning is free when
nothing changed; an interrupted run resumes at its finished blocks.

Exit codes: 0 done, 2 bad recipe or data (the message names the key, file, record and field).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--kind", choices=("auto", "sft", "preference"), default="auto",
                        help="what the data holds: SFT conversations or preference pairs "
                             "(auto: from the first record's fields)")


def detect_kind(files: list[Path]) -> str:
    """sft when the first record has `messages`, preference when it has `chosen`."""
    from avr_megatron.data.records import DataError, iter_rows

    f = files[0]
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        fields = set(pq.ParquetFile(f).schema_arrow.names)
    else:
        first = next(iter_rows(f), (0, {}))[1]
        fields = set(first) if isinstance(first, dict) else set()
    if "chosen" in fields:
        return "preference"
    if "messages" in fields:
        return "sft"
    raise DataError(f"{f}: cannot tell SFT data (field 'messages') from preference pairs "
                    f"(field 'chosen') by the first record (fields: {', '.join(sorted(fields))});"
                    " pass --kind")


def run(args, cfg) -> int:
    from avr_megatron.data.dataset import SPLITS, data_path, load_training_data
    from avr_megatron.data.prepared import read_meta
    from avr_megatron.data.records import DataError, resolve_files

    if cfg.data.prepared == "in_memory":
        print("avr prepare: error: data.prepared=in_memory says training does not use prepared "
              "data; set data.prepared=auto (or required)", file=sys.stderr)
        return 2
    rows = []
    try:
        for split in SPLITS:
            if getattr(cfg.data, split) is None and split != "train":
                continue
            kind = args.kind
            if kind == "auto":
                kind = detect_kind(resolve_files(data_path(cfg, split)))
            t0 = time.time()
            td = load_training_data(cfg, kind, split=split, progress=True)
            s = td.data.summary
            meta = read_meta(td.prepared) or {}
            rows.append({"split": split, "kind": kind, "prepared": str(td.prepared),
                         "records": s.records, "used": s.used, "dropped": s.dropped,
                         "truncated": s.truncated, "tokens": s.tokens,
                         "bins": td.plan.num_bins, "seconds": round(time.time() - t0, 2),
                         "built": meta.get("created")})
    except DataError as e:
        print(f"avr prepare: error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "none"
        print(f"avr prepare: data.{r['split']} ({r['kind']}): {r['used']} of {r['records']} "
              f"records used (dropped: {dropped}; truncated {r['truncated']}), {r['tokens']} "
              f"tokens in {r['bins']} bins, {r['seconds']} s -> {r['prepared']}")
    from avr_megatron.runtime.files import atomic_write_text

    atomic_write_text(Path(cfg.run.dir) / "prepare_summary.json", json.dumps(rows, indent=2))
    return 0
