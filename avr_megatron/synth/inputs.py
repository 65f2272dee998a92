"""Synthesis input: prompts (and optional first answers / chosen answers) from a JSONL or Parquet
file, a directory of them, a `save_to_disk` dataset or a hub dataset, through the field mapping in
`synth.input.fields`.

Every source row becomes either a `PromptRecord` or an `InvalidRecord` (row number, id when one
could be read, field, reason): bad rows never stop a run and never vanish silently. JSONL is read
line by line (not through Arrow), so one malformed line or one row with the wrong types is one
invalid record instead of a failed load; a line that is not UTF-8 is one invalid record naming its
byte offset. Rows are read one at a time and only this shard's valid records are kept, so a huge
row (a 10 MB prompt) is held only while it is checked: `load_prompts(check=...)` measures each of
this shard's records (in tokens, see `synth.lengths`) and turns the ones that do not fit into
invalid records right away. Shards partition rows by position (`row % N == i`), so `--shard i/N`
runs are disjoint and together complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import SynthInputConfig
from avr_megatron.method.chat import Message, check_text, message, validate_conversation

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to work on: the source row it came from, its id and conversation, what else it
    carries. The synthesis passes and `avr eval` take these as their work items."""

    row: int
    prompt_id: str
    x: list[Message]
    y0: str | None = None
    # The source set's chosen conversation ([*x, chosen answer]): the stage-2 start and the RSFT
    # mix-in.
    chosen: list[Message] | None = None
    # `avr synth thoughts` reads its prompts from the stage-2 rows, with the source answer's reward.
    source_reward: float | None = None


@dataclass(frozen=True)
class InvalidRecord:
    row: int
    prompt_id: str | None
    field: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "id": self.prompt_id, "field": self.field, "reason": self.reason}


@dataclass
class LoadedInput:
    source: str
    records: list[PromptRecord]
    invalid: list[InvalidRecord]
    rows: int
    shard: tuple[int, int] = (0, 1)
    # Digest of all valid records of the source (ids, prompts, answers, in every shard): a resumed
    # run or another shard checks it reads the same input.
    digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_shard(text: str | None) -> tuple[int, int]:
    """`"i/N"` -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def _files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
                   and p.name.endswith(_JSON_SUFFIXES + _PARQUET_SUFFIXES))
    if not files:
        raise ConfigError(f"synth.input.path={str(directory)!r}: no .jsonl/.json/.parquet files in this directory")
    return files


class _BadLine:
    """A JSONL line that is not a JSON object (kept as a row so it is reported, not skipped)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _read_jsonl(path: Path) -> Iterator[Any]:
    """Rows of a JSONL file, one line in memory at a time (or of a `.json` array file, which is
    one JSON document and so is read whole)."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096)
        f.seek(0)
        if path.name.endswith(".json") and head.lstrip().startswith(b"["):  # a JSON array file
            data = f.read()
            try:
                rows = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not valid UTF-8 at byte offset {e.start}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON: {e}") from None
            del data
            yield from rows
            return
        offset = 0
        for n, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _BadLine(f"{path.name} line {n}: not valid UTF-8 (byte offset {start + e.start} "
                               "of the file)")
                continue
            del raw
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _BadLine(f"{path.name} line {n}: not valid JSON ({e.msg})")


def _read_parquet(path: Path) -> Iterator[Any]:
    """Rows of a Parquet file, one record batch in memory at a time; a row whose strings are not
    UTF-8 is one invalid record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        try:
            yield from batch.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            for k in range(batch.num_rows):
                try:
                    yield batch.slice(k, 1).to_pylist()[0]
                except (UnicodeDecodeError, pa.ArrowException) as e:
                    yield _BadLine(f"{path.name} row {start + k}: not valid UTF-8 ({e})")
        start += batch.num_rows


def _is_disk_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())


def _read_disk(path: Path, split: str) -> Iterator[Any]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ConfigError(f"synth.input.split={split!r}: {path} has splits {sorted(ds)}")
        ds = ds[split]
    yield from ds


def _read_hub(name: str, split: str) -> Iterator[Any]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # offline machines, unknown names: say what was tried
        raise ConfigError(f"synth.input.path={name!r}: not a local file or directory, and loading it as a hub "
                          f"dataset failed ({type(e).__name__}: {str(e)[:300]})") from None
    yield from ds


def iter_source_rows(cfg: SynthInputConfig) -> tuple[str, Iterator[Any]]:
    """(a description of the source, its rows in order)."""
    if not cfg.path:
        raise ConfigError("synth.input.path is not set: give a JSONL/Parquet file or directory, a save_to_disk "
                          "dataset directory, or a hub dataset name")
    path = Path(cfg.path)
    fmt = cfg.format
    if fmt == "hub" or (fmt == "auto" and not path.exists()):
        if fmt == "auto" and (path.suffix or cfg.path.startswith((".", "/"))):
            raise ConfigError(f"synth.input.path={cfg.path!r}: no such file or directory")
        return f"hub:{cfg.path}[{cfg.split}]", _read_hub(cfg.path, cfg.split)
    if not path.exists():
        raise ConfigError(f"synth.input.path={cfg.path!r}: no such file or directory")
    if fmt == "disk" or (fmt == "auto" and _is_disk_dataset(path)):
        return f"disk:{path}[{cfg.split}]", _read_disk(path, cfg.split)
    files = _files(path) if path.is_dir() else [path]

    def rows() -> Iterator[Any]:
        for f in files:
            as_parquet = fmt == "parquet" or (fmt == "auto" and f.name.endswith(_PARQUET_SUFFIXES))
            if not as_parquet and fmt == "auto" and not f.name.endswith(_JSON_SUFFIXES):
                raise ConfigError(f"{f}: cannot tell the format from the name; set synth.input.format")
            yield from (_read_parquet(f) if as_parquet else _read_jsonl(f))

    return str(path), rows()


class _Invalid(Exception):
    def __init__(self, field_name: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field_name, reason


def _get(row: Mapping[str, Any], name: str) -> Any:
    if name not in row:
        raise _Invalid(name, f"field {name!r} is missing")
    value = row[name]
    if value is None:
        raise _Invalid(name, f"field {name!r} is null")
    return value


def _prompt(value: Any, name: str) -> list[Message]:
    if isinstance(value, str):
        try:
            check_text(value, name)
        except ValueError as e:
            raise _Invalid(name, str(e)) from None
        return [message("user", value)]
    if not isinstance(value, (list, tuple)):
        raise _Invalid(name, f"{name}: expected a string or a list of messages, got {type(value).__name__}")
    try:
        return validate_conversation(value, name, last_role="user")
    except ValueError as e:
        raise _Invalid(name, str(e)) from None


def _answer(value: Any, name: str) -> str:
    """A string, or a conversation whose last turn is the assistant's answer."""
    if not isinstance(value, str):
        try:
            conv = validate_conversation(value, name, last_role="assistant")
        except ValueError as e:
            raise _Invalid(name, str(e)) from None
        value = conv[-1]["content"]
    try:
        return check_text(value, name)
    except ValueError as e:
        raise _Invalid(name, str(e)) from None


def _chosen(value: Any, name: str, x: list[Message], system: bool) -> list[Message]:
    """[*x, chosen answer]. A conversation must hold the prompt before its answer (its own turns
    are kept, as the reference mixed them in; without the system turn of synth.input.fields.system
    when that added one)."""
    if isinstance(value, str):
        return [*x, message("assistant", _answer(value, name))]
    try:
        conv = validate_conversation(value, name, last_role="assistant")
    except ValueError as e:
        raise _Invalid(name, str(e)) from None
    if conv[:-1] != x and not (system and conv[:-1] == x[1:]):
        raise _Invalid(name, f"field {name!r}: the turns before the chosen answer differ from the prompt")
    return conv


def parse_row(row: Any, index: int, cfg: SynthInputConfig) -> PromptRecord:
    """One source row -> PromptRecord; raises _Invalid naming the field."""
    f = cfg.fields
    if isinstance(row, _BadLine):
        raise _Invalid(None, row.reason)
    if not isinstance(row, Mapping):
        raise _Invalid(None, f"expected a JSON object / table row, got {type(row).__name__}")
    prompt_id = f"row-{index}"
    if f.id is not None:
        raw = _get(row, f.id)
        if isinstance(raw, bool) or not isinstance(raw, (str, int)) or (isinstance(raw, str) and not raw.strip()):
            raise _Invalid(f.id, f"field {f.id!r}: expected a non-empty string or an integer, got {raw!r}")
        prompt_id = str(raw)
    x = _prompt(_get(row, f.prompt), f.prompt)
    if f.system is not None:
        system = _get(row, f.system)
        if not isinstance(system, str) or not system.strip():
            raise _Invalid(f.system, f"field {f.system!r}: expected a non-empty string, got {system!r}")
        if x[0]["role"] == "system":
            raise _Invalid(f.system, f"field {f.prompt!r} already starts with a system message")
        x = [message("system", system), *x]
    y0 = _answer(_get(row, f.answer), f.answer) if f.answer is not None else None
    chosen = _chosen(_get(row, f.chosen), f.chosen, x, f.system is not None) if f.chosen is not None else None
    for name, value in ((f.prompt, x), (f.answer, y0), (f.chosen, chosen)):
        _check_encodable(value, name)
    return PromptRecord(index, prompt_id, x, y0, chosen)


def _check_encodable(value: Any, name: str | None) -> None:
    """JSON `\\ud800`-style escapes decode to lone surrogates, which no tokenizer or Parquet
    file can take: such a row is invalid, not a crash later in the chunk."""
    texts = [value] if isinstance(value, str) else [m["content"] for m in value or ()]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Invalid(name, f"field {name!r}: not valid UTF-8 text (a lone surrogate at "
                                 f"character {e.start})") from None


def _row_id(row: Any, cfg: SynthInputConfig) -> str | None:
    if cfg.fields.id is None or not isinstance(row, Mapping):
        return None
    raw = row.get(cfg.fields.id)
    return None if raw is None else str(raw)


def _digest_update(h, r: PromptRecord) -> None:
    h.update(json.dumps([r.row, r.prompt_id, r.x, r.y0, r.chosen], ensure_ascii=False).encode())


# check(record) -> None when the record can be worked on, else (field, reason) to list it invalid.
RecordCheck = Callable[[PromptRecord], "tuple[str | None, str] | None"]


def load_prompts(cfg: SynthInputConfig, shard: tuple[int, int] = (0, 1),
                 check: RecordCheck | None = None) -> LoadedInput:
    """All rows, validated; then this shard's share. Duplicate ids are judged over the whole
    source (the first occurrence is kept), so shards agree on which rows are valid. `check` runs
    on this shard's valid records only (e.g. prompt length in tokens); the digest covers every
    shard's valid records before it, so every shard of one run has the same fingerprint."""
    source, rows = iter_source_rows(cfg)
    i, n = shard
    records: list[PromptRecord] = []
    invalid: list[InvalidRecord] = []
    first_row: dict[str, int] = {}
    digest = hashlib.sha256()
    count = 0
    for index, row in enumerate(rows):
        if cfg.limit is not None and index >= cfg.limit:
            break
        count += 1
        try:
            record = parse_row(row, index, cfg)
            if record.prompt_id in first_row:
                raise _Invalid(cfg.fields.id, f"duplicate id {record.prompt_id!r} (first at row {first_row[record.prompt_id]})")
            first_row[record.prompt_id] = index
        except _Invalid as e:
            if index % n == i:
                invalid.append(InvalidRecord(index, _row_id(row, cfg), e.field, e.reason))
            continue
        finally:
            del row  # a huge row lives no longer than its own check
        _digest_update(digest, record)
        if index % n != i:
            continue
        problem = check(record) if check is not None else None
        if problem is not None:
            invalid.append(InvalidRecord(index, record.prompt_id, *problem))
            continue
        records.append(record)
    return LoadedInput(source, records, invalid, count, shard, digest.hexdigest())
