"""Read SFT and preference records from Parquet / JSONL files, shard directories or globs.

Each record is checked as it is read; a bad one raises `DataError` naming the file, the record
(row number and id) and the field, and nothing is silently skipped. Only the fields training
needs are kept; extra columns (provenance, rewards, ...) are ignored.

    SFT:        {"id", "messages": [{"role", "content"}, ...]}   (at least one assistant turn)
    preference: {"id", "prompt": [messages], "chosen": [assistant message(s)], "rejected": [...],
                 "reward_gap" | "reward_chosen" + "reward_rejected" (optional)}

This is TRL's conversational preference format; the AvR synthesis writes it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")
_SUFFIXES = (".parquet", ".jsonl", ".json")


class DataError(ValueError):
    """A data file or record is unusable; the message names file, record and field."""


@dataclass(frozen=True)
class SFTRecord:
    id: str
    messages: tuple[dict, ...]
    where: str  # "file: record N (id ...)" for later error messages


@dataclass(frozen=True)
class PreferenceRecord:
    id: str
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]
    # reward_chosen - reward_rejected from the reward model; None when the data has none.
    reward_gap: float | None
    where: str


def resolve_files(path: str | os.PathLike) -> list[Path]:
    """A file, a directory (its *.parquet / *.jsonl / *.json files, recursively) or a glob ->
    sorted data files. Raises DataError when nothing matches."""
    text = str(path)
    p = Path(text)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True)
                       if Path(f).is_file() and Path(f).suffix in _SUFFIXES)
    else:
        raise DataError(f"{text}: no such file or directory")
    if not files:
        raise DataError(f"{text}: no .parquet, .jsonl or .json files found")
    for f in files:
        if f.suffix not in _SUFFIXES:
            raise DataError(f"{f}: unsupported data file type {f.suffix!r} "
                            f"(expected one of {', '.join(_SUFFIXES)})")
    return files


@dataclass(frozen=True)
class Span:
    """Part of one data file, for reading a large dataset in blocks: JSONL bytes
    [start, stop) (starting at a line start, first_row = its line number), or Parquet rows
    [start, stop) of row group `row_group` (first_row = the first one's number in the file)."""

    start: int
    stop: int
    first_row: int
    row_group: int | None = None


def _rows(path: Path, span: Span | None = None) -> Iterator[tuple[int, Any]]:
    """(row number from 1, raw record) for every record of one file, or of a span of it."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            if span is None:
                table = pq.read_table(path)
            else:
                table = pq.ParquetFile(path).read_row_group(span.row_group).slice(
                    span.start, span.stop - span.start)
        except Exception as e:
            raise DataError(f"{path}: cannot read Parquet: {e}") from e
        start = (1 if span is None else span.first_row) - 1
        for batch in table.to_batches(max_chunksize=1024):
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:
                for k in range(batch.num_rows):  # find the record
                    try:
                        batch.slice(k, 1).to_pylist()
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}: record {start + k + 1}: a string is not valid "
                                        f"UTF-8 ({e.reason} at byte {e.start} of the value)"
                                        ) from None
                raise
            yield from enumerate(rows, start + 1)
            start += batch.num_rows
        return
    with open(path, "rb") as f:
        if span is None and _is_json_array(f):
            try:
                rows = json.loads(_decode(f.read(), path))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON: {e}") from e
            yield from enumerate(rows, 1)
            return
        start, stop, i = (0, None, 1) if span is None else (span.start, span.stop,
                                                            span.first_row)
        f.seek(start)
        offset = start
        for i, raw in enumerate(f, i):
            if stop is not None and offset >= stop:
                return
            line = _decode(raw, path, line=i, offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: invalid JSON: {e}") from e


iter_rows = _rows


def _is_json_array(f) -> bool:
    """A .json file holding one array of records (first non-space byte `[`); rewinds f."""
    head = f.read(4096).lstrip()[:1]
    f.seek(0)
    return head == b"["


def is_json_array_file(path: Path) -> bool:
    if path.suffix == ".parquet":
        return False
    with open(path, "rb") as f:
        return _is_json_array(f)


def _decode(data: bytes, path: Path, *, line: int | None = None, offset: int = 0) -> str:
    """UTF-8 text, or a DataError naming the file, line and byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:  # a whole file: find the line
            line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (byte {data[e.start]:#04x} at byte "
                        f"offset {offset + e.start} of the file); re-encode the file as UTF-8"
                        ) from None


def _where(path: Path, row: int, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return location(path, row, rid if isinstance(rid, str) else None)


def location(path: Path, row: int, rid: str | None = None) -> str:
    """How messages name a record: "file: line N (id 'x')" ("record N" in Parquet)."""
    unit = "record" if path.suffix == ".parquet" else "line"
    return f"{path}: {unit} {row}" + (f" (id {rid!r})" if rid is not None else "")


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(sorted(record))})")
    return record[name]


def _messages(value: Any, field: str, where: str, *, last_role: str | None = None,
              need_assistant: bool = False) -> tuple[dict, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: field {field!r}: expected a non-empty list of messages, "
                        f"got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {at!r}: expected a message object with role and "
                            f"content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field {at + '.role'!r}: expected one of {list(ROLES)}, "
                            f"got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field {at + '.content'!r}: expected a string, got "
                            f"{type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:  # a JSON "\\ud800" escape: no tokenizer takes it
            raise DataError(f"{where}: field {at + '.content'!r}: not valid UTF-8 text (a lone "
                            f"surrogate at character {e.start})") from None
        out.append({"role": role, "content": content})
    if last_role is not None and out[-1]["role"] != last_role:
        raise DataError(f"{where}: field {field!r}: the last message must have role "
                        f"{last_role!r}, got {out[-1]['role']!r}")
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field {field!r}: no assistant message to learn from")
    return tuple(out)


def _completion(value: Any, field: str, where: str) -> tuple[dict, ...]:
    if isinstance(value, str):  # TRL also accepts a bare completion string
        value = [{"role": "assistant", "content": value}]
    return _messages(value, field, where, last_role="assistant")


def _number(record: dict, name: str, where: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {name!r}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field {name!r}: must be finite, got {value}")
    return float(value)


def _id(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object / table row, got {type(record).__name__}")
    rid = _field(record, "id", where)
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{where}: field 'id': expected a non-empty string, got {rid!r}")
    return rid


def _check_unique(seen: dict[str, str], rid: str, where: str) -> None:
    if rid in seen:
        raise DataError(f"{where}: duplicate id {rid!r} (first seen at {seen[rid]})")
    seen[rid] = where


def sft_record(path: Path, row: int, record: Any, seen: dict[str, str]) -> SFTRecord:
    """One checked SFT row (its id must not be in `seen`, which it is added to)."""
    where = _where(path, row, record)
    rid = _id(record, where)
    _check_unique(seen, rid, where)
    messages = _messages(_field(record, "messages", where), "messages", where,
                         need_assistant=True)
    return SFTRecord(rid, messages, where)


def preference_record(path: Path, row: int, record: Any,
                      seen: dict[str, str]) -> PreferenceRecord:
    """One checked preference row (its id must not be in `seen`, which it is added to)."""
    where = _where(path, row, record)
    rid = _id(record, where)
    _check_unique(seen, rid, where)
    prompt = _messages(_field(record, "prompt", where), "prompt", where)
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt': the prompt must end with a user (or "
                        "system) message, not an assistant one")
    chosen = _completion(_field(record, "chosen", where), "chosen", where)
    rejected = _completion(_field(record, "rejected", where), "rejected", where)
    gap = _number(record, "reward_gap", where)
    rc, rr = _number(record, "reward_chosen", where), _number(record, "reward_rejected", where)
    if gap is None and rc is not None and rr is not None:
        gap = rc - rr
    return PreferenceRecord(rid, prompt, chosen, rejected, gap, where)


RECORD_READERS = {"sft": sft_record, "preference": preference_record}


def read_records(kind: str, path: str | os.PathLike) -> list:
    """Every record of the files at `path` (kind: sft | preference), checked, in order."""
    parse, out, seen = RECORD_READERS[kind], [], {}
    for f in resolve_files(path):
        for row, record in _rows(f):
            out.append(parse(f, row, record, seen))
    return out


def read_span(kind: str, path: Path, span: Span | None, seen: dict[str, str]) -> Iterator:
    """(row number, checked record) for one span of one file, in order (ids unique within
    `seen`)."""
    parse = RECORD_READERS[kind]
    for row, record in _rows(path, span):
        yield row, parse(path, row, record, seen)


def read_sft(path: str | os.PathLike) -> list[SFTRecord]:
    return read_records("sft", path)


def read_preferences(path: str | os.PathLike) -> list[PreferenceRecord]:
    return read_records("preference", path)
