"""Sharded, resumable output of a synthesis pass (avr_megatron.synth.passes).

Layout of an output directory (one per pass):

    <out>/data/train-<shard>-of-<N>-c<chunk>.parquet  one file per finished chunk of prompts
    <out>/manifest-<shard>-of-<N>.json                 fingerprint, progress, invalid records
    <out>/summary-<shard>-of-<N>.json, <out>/summary.json

A chunk file is written to a hidden temporary name in the same directory, fsynced and renamed,
so it either exists complete or not at all; chunk boundaries are fixed by the prompt order and
`synth.chunk_size`, so a resumed run redoes exactly the unfinished chunks and can never write a
prompt twice. The fingerprint (everything that changes what a chunk holds) is checked on resume,
and every shard of one directory must agree on it and on N.
`datasets.load_dataset("parquet", data_files="<out>/data/*.parquet")` (or `load_output`) reads
the result.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.runtime import files

_EXT = {"parquet": "parquet", "jsonl": "jsonl"}


def encode_rows(rows: Sequence[dict[str, Any]], schema, fmt: str) -> bytes:
    """Rows -> file bytes with the explicit Arrow schema (Parquet) or as JSON lines."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_rows(path: Path, rows: Sequence[dict[str, Any]], schema, fmt: str) -> None:
    files.atomic_write_bytes(path, encode_rows(rows, schema, fmt))


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class ShardStore:
    """The files of one shard of one pass's output directory."""

    def __init__(self, out_dir: str | Path, *, kind: str, shard: tuple[int, int], fmt: str,
                 fingerprint: dict[str, Any]) -> None:
        if fmt not in _EXT:
            raise ConfigError(f"synth.output_format={fmt!r} is not one of {sorted(_EXT)}")
        self.out = Path(out_dir)
        self.data = self.out / "data"
        self.kind = kind
        self.shard, self.num_shards = shard
        self.fmt = fmt
        self.fingerprint = {**fingerprint, "kind": kind, "num_shards": self.num_shards, "output_format": fmt}
        self.tag = f"{self.shard:05d}-of-{self.num_shards:05d}"
        self._part = re.compile(rf"^train-{self.tag}-c(\d{{6}})\.{_EXT[fmt]}$")

    @property
    def manifest_path(self) -> Path:
        return self.out / f"manifest-{self.tag}.json"

    @property
    def summary_path(self) -> Path:
        return self.out / f"summary-{self.tag}.json"

    def part_path(self, chunk: int) -> Path:
        return self.data / f"train-{self.tag}-c{chunk:06d}.{_EXT[self.fmt]}"

    def open(self) -> None:
        """Check the directory holds this run (or nothing), then clear stale temp files."""
        self.data.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.out.glob("manifest-*.json")):
            other = json.loads(path.read_text())
            theirs = other.get("fingerprint", {})
            if theirs != self.fingerprint:
                keys = ", ".join(_diff(theirs, self.fingerprint))
                raise ConfigError(
                    f"{self.out}: holds {path.name} from a run with a different configuration (differs in: {keys}). "
                    "Resume with the same recipe, shard count and input, or set synth.output_dir (or run.dir) "
                    "to a new directory.")
        # Partial chunk files, manifests and summaries of a killed run: this shard's whatever
        # wrote them (one process per shard), other shards' and the merged summary's when their
        # writer is dead.
        for directory in (self.data, self.out):
            for tmp in directory.glob(".*.tmp"):
                if tmp.name.startswith((f".train-{self.tag}-", f".manifest-{self.tag}.",
                                        f".summary-{self.tag}.")):
                    tmp.unlink(missing_ok=True)
            files.remove_stale(directory, files.STALE_FILE)

    def done_chunks(self) -> set[int]:
        done = set()
        for path in self.data.iterdir():
            match = self._part.match(path.name)
            if match:
                done.add(int(match.group(1)))
        return done

    def write_chunk(self, chunk: int, rows: Sequence[dict[str, Any]], schema) -> Path:
        path = self.part_path(chunk)
        try:
            write_rows(path, rows, schema, self.fmt)
        except OSError as e:
            self._storage_failure(path, e)
            raise
        return path

    def write_manifest(self, **fields: Any) -> None:
        self._manifest = fields
        try:
            files.atomic_write_json(self.manifest_path, self._manifest_record(fields))
        except OSError as e:
            self._storage_failure(self.manifest_path, e)
            raise

    def _manifest_record(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"kind": self.kind, "shard": self.shard, "num_shards": self.num_shards,
                "fingerprint": self.fingerprint, "fingerprint_sha256": fingerprint_digest(self.fingerprint),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}

    def _storage_failure(self, path: Path, error: OSError) -> None:
        """Disk full / read-only: raise a StorageError naming the path and the finished chunks
        (kept; a rerun skips them), after recording the error in the manifest if space allows."""
        done = len(self.done_chunks()) if self.data.is_dir() else 0
        err = files.storage_error(
            path, error, kept=f"{done} finished chunk file(s) of shard {self.shard}/{self.num_shards} in {self.data} "
                              "(the chunk in flight is lost)",
            resume="free space (or make it writable) and rerun the same command: finished chunks are skipped")
        if err is None:
            return
        manifest = getattr(self, "_manifest", None)
        if manifest is not None and path != self.manifest_path:
            try:
                files.atomic_write_json(self.manifest_path, self._manifest_record({**manifest, "error": str(err)}))
            except OSError:
                pass
        raise err from error

    def shard_rows(self) -> list[dict[str, Any]]:
        """This shard's rows, chunk by chunk."""
        rows: list[dict[str, Any]] = []
        for chunk in sorted(self.done_chunks()):
            rows.extend(read_rows(self.part_path(chunk)))
        return rows


def output_parts(out_dir: str | Path) -> list[Path]:
    data = Path(out_dir) / "data"
    if not data.is_dir():
        return []
    return sorted(p for p in data.iterdir() if p.name.startswith("train-") and p.suffix in (".parquet", ".jsonl"))


def read_output(out_dir: str | Path, *, require_complete: bool = True, what: str = "output") -> list[dict[str, Any]]:
    """Every row of a stage's output directory (all shards), checking that each shard finished."""
    out = Path(out_dir)
    manifests = sorted(out.glob("manifest-*.json"))
    if not manifests:
        raise ConfigError(f"{what} {out}: no synthesis output here (no manifest-*.json); run the synth command first")
    if require_complete:
        infos = [json.loads(p.read_text()) for p in manifests]
        num = infos[0]["num_shards"]
        missing = sorted(set(range(num)) - {i["shard"] for i in infos})
        unfinished = sorted(i["shard"] for i in infos if not i.get("complete"))
        if missing or unfinished:
            raise ConfigError(f"{what} {out}: not complete (of {num} shards, missing: {missing or 'none'}, unfinished: "
                              f"{unfinished or 'none'}); finish those `--shard i/{num}` runs first")
    rows: list[dict[str, Any]] = []
    for part in output_parts(out):
        rows.extend(read_rows(part))
    rows.sort(key=lambda r: r["row"])
    return rows


def load_output(out_dir: str | Path, split: str = "train"):
    """The output directory as a `datasets.Dataset`."""
    from datasets import load_dataset

    parts = output_parts(out_dir)
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no output parts")
    builder = "parquet" if parts[0].suffix == ".parquet" else "json"
    return load_dataset(builder, data_files=[str(p) for p in parts], split=split)
