"""The prepared-data format: a tokenised dataset as flat binary files that every rank maps
(numpy memmap) instead of tokenising the data itself, Megatron-LM's .bin/.idx idea.

One prepared directory holds exactly what `TokenizedDataset` holds, in unit order:

    meta                JSON: format, the key it was built from, the DataSummary (records, drops
                        by reason, truncations, token counts), the data fingerprint, the largest
                        token id, the data file names; written last (present = complete)
    tokens.bin          int32 [tokens]      token ids of every sequence, end to end
    mask.bin            bool  [tokens]      trained (assistant) token
    seq_offsets.bin     int64 [seqs + 1]    sequence s is tokens[seq_offsets[s]:seq_offsets[s+1]]
    reward_gap.bin      float64 [units]     preference data only (nan: none in the record)
    ids.bin, id_offsets.bin                 record ids, UTF-8 end to end, and their offsets
    unit_file.bin       int32 [units]       which data file (index in sorted order) ...
    unit_row.bin        int64 [units]       ... and row/line the unit came from (error messages)
    example_hash.bin    S16 [units]         hash of each unit's tokens and masks (reference
                                            log-prob stores key on it)
    bfd_units.bin, bfd_offsets.bin, bfd_fill.bin   the best-fit-decreasing packing plan

A build writes one `block-NNNNNN.npz` per block of records (see `write_block`); `merge_blocks`
streams them into the files above. Nothing is loaded when a directory is opened: arrays are
mapped read-only and pages are read only when a batch touches them, so a rank's memory does not
grow with the dataset beyond the pages it reads.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from avr_megatron.data.packing import PackingPlan, pack_best_fit_decreasing
from avr_megatron.data.records import location
from avr_megatron.data.tokenized import DataSummary, TokenizedDataset, compute_example_hash
from avr_megatron.runtime import files as runtime_files

FORMAT = "avr-megatron/prepared/1"
META = "meta"  # JSON; no .json suffix, so a data directory holding this is not read as data

# name -> dtype of every per-unit / per-token array file.
_ARRAYS = {"tokens": np.int32, "mask": np.bool_, "seq_offsets": np.int64,
           "reward_gap": np.float64, "ids": np.uint8, "id_offsets": np.int64,
           "unit_file": np.int32, "unit_row": np.int64, "example_hash": "S16",
           "bfd_units": np.int64, "bfd_offsets": np.int64, "bfd_fill": np.int64}


# --------------------------------------------------------------------------------------------
# Blocks (written by build workers)

@dataclass
class BlockResult:
    """What a build worker reports about one block besides the file it wrote."""

    index: int
    records: int  # records read (before an error, if any)
    error: dict | None = None  # {"stage": "read" | "tokenize", "position", "message"}
    summary: dict | None = None


def id_hash(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


def _blob(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def write_block(path: Path, data: TokenizedDataset | None, read_ids: Sequence[str],
                read_rows: Sequence[int], unit_rows: Sequence[int]) -> None:
    """Atomically write one block: its tokenised units (None when the block failed) and the ids
    and rows of every record read (for the dataset-wide duplicate-id check)."""
    arrays = {"read_id_hash": np.asarray([id_hash(r) for r in read_ids], np.uint64),
              "read_rows": np.asarray(read_rows, np.int64)}
    arrays["read_ids"], arrays["read_id_offsets"] = _blob(read_ids)
    if data is not None:
        ids, id_offsets = _blob(data.ids)
        arrays.update(
            tokens=np.asarray(data.tokens, np.int32), mask=np.asarray(data.mask, np.bool_),
            seq_lengths=np.diff(data.seq_offsets).astype(np.int64),
            ids=ids, id_offsets=id_offsets, unit_row=np.asarray(unit_rows, np.int64),
            example_hash=np.asarray([compute_example_hash(data, u) for u in range(len(data))],
                                    "S16"))
        if data.reward_gap is not None:
            arrays["reward_gap"] = np.asarray(data.reward_gap, np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    runtime_files.atomic_write_bytes(path, buf.getvalue())


def _strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [raw[offsets[i]:offsets[i + 1]].decode() for i in range(len(offsets) - 1)]


def block_read_ids(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hashes, rows) of every record a block read."""
    with np.load(path) as z:
        return z["read_id_hash"], z["read_rows"]


def block_read_id(path: Path, position: int) -> str:
    with np.load(path) as z:
        o = z["read_id_offsets"]
        return z["read_ids"][o[position]:o[position + 1]].tobytes().decode()


# --------------------------------------------------------------------------------------------
# Merging blocks into a prepared directory

def _sum_summaries(kind: str, summaries: Sequence[dict]) -> DataSummary:
    total = DataSummary(kind)
    for s in summaries:
        for k in ("records", "used", "truncated", "sequences", "tokens", "target_tokens"):
            setattr(total, k, getattr(total, k) + s[k])
        for reason, n in s["dropped"].items():  # first-seen order, as one pass would count
            total.dropped[reason] = total.dropped.get(reason, 0) + n
        for name, n in s.get("notes", {}).items():
            total.notes[name] = total.notes.get(name, 0) + n
    return total


def merge_blocks(out: Path, kind: str, blocks: Sequence[tuple[Path, int]],
                 summaries: Sequence[dict], capacity: int, meta: dict) -> dict:
    """Stream block files (path, data-file index), in order, into the prepared files in `out`
    (a fresh directory), pack, and write meta.json last. Returns the meta."""
    out.mkdir(parents=True)
    files = {name: open(out / f"{name}.bin", "wb") for name in
             ("tokens", "mask", "seq_offsets", "ids", "id_offsets", "unit_file", "unit_row",
              "example_hash") + (("reward_gap",) if kind == "preference" else ())}
    h = hashlib.sha256()
    tokens = id_bytes = 0
    max_token = -1
    unit_lengths = []
    files["seq_offsets"].write(np.zeros(1, np.int64).tobytes())
    files["id_offsets"].write(np.zeros(1, np.int64).tobytes())
    try:
        for path, file_index in blocks:
            with np.load(path) as z:
                if "tokens" not in z:
                    raise ValueError(f"{path}: block has no data (a failed block)")
                tok, lengths = z["tokens"], z["seq_lengths"]
                if len(tok):
                    max_token = max(max_token, int(tok.max()))
                files["tokens"].write(tok.tobytes())
                files["mask"].write(z["mask"].tobytes())
                files["seq_offsets"].write((tokens + np.cumsum(lengths)).tobytes())
                tokens += int(lengths.sum())
                per = 1 if kind == "sft" else 2
                unit_lengths.append(lengths.reshape(-1, per).sum(1))
                ids, offsets = z["ids"], z["id_offsets"]
                files["ids"].write(ids.tobytes())
                files["id_offsets"].write((id_bytes + offsets[1:]).tobytes())
                id_bytes += int(offsets[-1])
                n = len(offsets) - 1
                files["unit_file"].write(np.full(n, file_index, np.int32).tobytes())
                files["unit_row"].write(z["unit_row"].tobytes())
                hashes = z["example_hash"]
                files["example_hash"].write(hashes.tobytes())
                if kind == "preference":
                    files["reward_gap"].write(z["reward_gap"].tobytes())
                for rid, eh in zip(_strings(ids, offsets), hashes.tolist()):
                    h.update(rid.encode())
                    h.update(eh)
    finally:
        for f in files.values():
            f.close()
    lengths = np.concatenate(unit_lengths) if unit_lengths else np.zeros(0, np.int64)
    plan = pack_best_fit_decreasing(lengths, capacity)
    for name, arr in (("bfd_units", plan.units), ("bfd_offsets", plan.offsets),
                      ("bfd_fill", plan.fill)):
        (out / f"{name}.bin").write_bytes(np.ascontiguousarray(arr, np.int64).tobytes())
    summary = _sum_summaries(kind, summaries)
    meta = {**meta, "format": FORMAT, "kind": kind, "units": int(len(lengths)),
            "summary": summary.as_dict(), "examples_fingerprint": h.hexdigest()[:16],
            "max_token": max_token if max_token >= 0 else None}
    runtime_files.atomic_write_text(out / META, json.dumps(meta, indent=2))
    return meta


# --------------------------------------------------------------------------------------------
# Opening a prepared directory

def _map(path: Path, dtype) -> np.ndarray:
    """Read-only map of a whole array file (an empty file is an empty array: mmap refuses it)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class IdTable(Sequence[str]):
    """Record ids decoded on access from the mapped UTF-8 blob."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return [self[i] for i in range(*u.indices(len(self)))]
        u = int(u)
        if u < 0:
            u += len(self)
        return self.blob[self.offsets[u]:self.offsets[u + 1]].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        for u in range(len(self)):
            yield self[u]


class HashTable(Sequence[str]):
    def __init__(self, raw: np.ndarray):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, u):
        return self.raw[int(u)].decode()


def read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / META).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return meta if meta.get("format") == FORMAT else None


def open_prepared(directory: Path, files: Sequence[Path]) -> tuple[TokenizedDataset, PackingPlan,
                                                                    dict]:
    """Map a prepared directory: (dataset, best-fit-decreasing plan, meta). `files` are this
    run's data files in sorted order (the ones the key was computed from), for messages."""
    meta = read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"{directory}: not a complete prepared-data directory")
    arr = {name: _map(directory / f"{name}.bin", dtype) for name, dtype in _ARRAYS.items()
           if (directory / f"{name}.bin").exists()}
    kind = meta["kind"]
    ids = IdTable(arr["ids"], arr["id_offsets"])
    unit_file, unit_row = arr["unit_file"], arr["unit_row"]
    files = list(files)

    def where(u: int) -> str:
        return location(files[int(unit_file[u])], int(unit_row[u]), ids[u])

    s = meta["summary"]
    summary = DataSummary(kind, records=s["records"], used=s["used"], dropped=dict(s["dropped"]),
                          notes=dict(s.get("notes", {})), truncated=s["truncated"],
                          sequences=s["sequences"], tokens=s["tokens"],
                          target_tokens=s["target_tokens"])
    data = TokenizedDataset(kind, ids, arr["seq_offsets"], arr["tokens"], arr["mask"],
                            arr.get("reward_gap"), summary, wheres=where,
                            example_hashes=HashTable(arr["example_hash"]),
                            fingerprint=meta["examples_fingerprint"],
                            max_token=meta["max_token"])
    plan = PackingPlan(int(meta["key"]["seq_length"]), arr["bfd_units"], arr["bfd_offsets"],
                       arr["bfd_fill"])
    return data, plan, meta
