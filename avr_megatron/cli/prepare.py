"""`avr prepare`: tokenise data.train (and data.valid) once into the prepared, memory-mapped form
that `avr train` and `avr logps` map (see avr_megatron.data.prepare). Rerunning is free when
nothing changed; an interrupted run resumes at its finished blocks. `--prune [--keep N]` then
deletes the other (stale) prepared versions of the same data, never one a process maps.

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
    parser.add_argument("--prune", action="store_true",
                        help="then delete the other prepared versions of the same data (other keys: "
                             "older data, tokenizer or settings), except the --keep newest and any "
                             "a running process maps or builds")
    parser.add_argument("--keep", type=int, default=0, metavar="N",
                        help="with --prune: also keep the N most recently built other versions")


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
    if args.prune:
        _prune(rows, args.keep)
    from avr_megatron.runtime.files import atomic_write_text

    atomic_write_text(Path(cfg.run.dir) / "prepare_summary.json", json.dumps(rows, indent=2))
    return 0


def _prune(rows: list[dict], keep_newest: int) -> None:
    """Prune the root each split's versions live under, keeping this run's versions; each row
    gets what happened to the other versions ("pruned")."""
    from avr_megatron.data.prepare import prune_prepared

    keep: dict[Path, set[str]] = {}
    for r in rows:
        path = Path(r["prepared"])
        keep.setdefault(path.parent, set()).add(path.name)
    done: dict[Path, list[dict]] = {}
    for r in rows:
        root = Path(r["prepared"]).parent
        if root not in done:
            done[root] = prune_prepared(root, keep[root], keep_newest)
            for v in done[root]:
                built = f", built {v['created']}" if v["created"] else ""
                print(f"avr prepare --prune: {v['action']}: {root / v['name']} "
                      f"({v['bytes'] / 2**20:.1f} MiB{built})")
        r["pruned"] = [v for v in done[root] if v["name"] not in keep[root]]
    every = [v for vs in done.values() for v in vs]
    freed = sum(v["bytes"] for v in every if v["action"] == "removed")
    busy = sum(v["action"] == "in use" for v in every)
    print(f"avr prepare --prune: freed {freed / 2**20:.1f} MiB"
          + (f"; {busy} version(s) in use by running processes left in place" if busy else ""))
