"""Tokenise once, map everywhere: build the prepared (memory-mapped) form of a dataset, or find
the one already built.

A prepared dataset lives under a root directory (`data.prepared_dir`, default next to the data:
`<data.train>.prepared/`) in a subdirectory named by its key: a hash of everything that decides
its content (the data files' content fingerprint, the tokenizer and chat template, the kind,
train.seq_length, data.overlong, data.sft_loss_on, the source of the modules that read and
tokenise records, and the transformers/tokenizers versions). Any change gives another key, so a
stale build is never used; it is simply not found.

Building: the data files are cut into blocks of records (about BLOCK_BYTES of JSONL, or
BLOCK_ROWS Parquet rows), tokenised by a pool of worker processes (every core by default,
`data.prepare_workers`), each block written atomically to `.<key>.build/`. A killed build
resumes at the finished blocks. The blocks are then merged into a hidden temporary directory,
packed, and renamed to `<key>/` in one step. One process builds at a time: ranks of a job (and
other jobs) take an exclusive file lock (`.<key>.lock`) and the others wait for it, then map the
result.

Versions in use: every process that maps a prepared directory holds a shared lock on
`.<key>.use` until it exits. `prune_prepared` (`avr prepare --prune [--keep N]`) deletes the
other keys' versions only when it can take that lock (and the build lock) exclusively, so a
version some job maps or builds is never deleted; a process that found a version just before
it was pruned sees it gone once it holds the lock, and builds it again.

Bad records fail the build the same way the unprepared path fails: the first record that
cannot be read (file, record and field named) or a duplicate id, else the first that cannot be
tokenised; over-long ones are dropped or truncated and counted by reason in the summary.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from avr_megatron.data import prepared as fmt
from avr_megatron.data.records import (
    DataError,
    Span,
    is_json_array_file,
    location,
    read_span,
)
from avr_megatron.runtime import files as runtime_files

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20
BLOCK_ROWS = 2048
# Modules whose code decides tokens, masks, drops and errors: editing them changes every key.
_TOKENISATION_SOURCES = ("records.py", "chat.py", "tokenized.py", "prepared.py")


@dataclass(frozen=True)
class Block:
    index: int
    file_index: int
    span: Span | None  # None: the whole file


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to tokenise a block (picklable)."""

    kind: str
    tokenizer: str
    seq_length: int
    overlong: str
    sft_loss_on: str


# --------------------------------------------------------------------------------------------
# The key

def _code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _TOKENISATION_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def prepared_key(settings: Settings, files_fingerprint: str, tokenizer_fp: str) -> dict:
    import tokenizers
    import transformers

    key = {"format": fmt.FORMAT, "kind": settings.kind, "files": files_fingerprint,
           "tokenizer": tokenizer_fp, "seq_length": settings.seq_length,
           "overlong": settings.overlong, "code": _code_fingerprint(),
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    if settings.kind == "sft":
        key["sft_loss_on"] = settings.sft_loss_on
    return key


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Blocks of records

def _jsonl_spans(path: Path) -> list[Span]:
    """Byte ranges of about BLOCK_BYTES starting at line starts, with their first line number."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        cut = BLOCK_BYTES
        while cut < size:
            f.seek(cut - 1)
            f.readline()  # to the first line start >= cut
            b = f.tell()
            if b >= size:
                break
            bounds.append(b)
            cut = b + BLOCK_BYTES
        bounds.append(size)
        spans, line = [], 1
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            spans.append(Span(lo, hi, line))
            f.seek(lo)
            left = hi - lo
            while left:
                chunk = f.read(min(left, 16 << 20))
                line += chunk.count(b"\n")
                left -= len(chunk)
    return spans


def _parquet_spans(path: Path) -> list[Span]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet: {e}") from e
    spans, first = [], 1
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        for lo in range(0, n, BLOCK_ROWS):
            hi = min(n, lo + BLOCK_ROWS)
            spans.append(Span(lo, hi, first + lo, row_group=g))
        first += n
    return spans


def split_blocks(files: Sequence[Path]) -> list[Block]:
    blocks: list[Block] = []
    for i, f in enumerate(files):
        if f.suffix == ".parquet":
            spans = _parquet_spans(f)
        elif is_json_array_file(f):
            spans = [None]
        else:
            spans = _jsonl_spans(f)
        blocks += [Block(len(blocks) + k, i, s) for k, s in enumerate(spans)]
    return blocks


# --------------------------------------------------------------------------------------------
# Workers

_worker: dict = {}


def _die_with_parent() -> None:
    """Linux: a worker is killed when the building process dies (kill -9 leaves no orphan)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(settings: Settings, files: list[Path], build_dir: Path, in_pool: bool) -> None:
    from avr_megatron.data.chat import ChatTokenizer, load_tokenizer

    if in_pool:
        _die_with_parent()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _worker.update(settings=settings, files=files, build_dir=build_dir,
                   chat=ChatTokenizer(load_tokenizer(settings.tokenizer)))


def block_path(build_dir: Path, index: int) -> Path:
    return build_dir / f"block-{index:06d}.npz"


def _build_block(block: Block) -> fmt.BlockResult:
    """Read, check and tokenise one block; write its file; report errors instead of raising."""
    from avr_megatron.data.tokenized import tokenize_preferences, tokenize_sft

    s: Settings = _worker["settings"]
    path = _worker["files"][block.file_index]
    out = block_path(_worker["build_dir"], block.index)
    records, rows, seen = [], [], {}
    try:
        for row, rec in read_span(s.kind, path, block.span, seen):
            records.append(rec)
            rows.append(row)
    except DataError as e:
        fmt.write_block(out, None, [r.id for r in records], rows, [])
        return fmt.BlockResult(block.index, len(records),
                               {"stage": "read", "position": len(records), "message": str(e)})
    try:
        if s.kind == "sft":
            data = tokenize_sft(records, _worker["chat"], s.seq_length, s.overlong, s.sft_loss_on)
        else:
            data = tokenize_preferences(records, _worker["chat"], s.seq_length, s.overlong)
    except DataError as e:
        fmt.write_block(out, None, [r.id for r in records], rows, [])
        return fmt.BlockResult(block.index, len(records),
                               {"stage": "tokenize", "position": 0, "message": str(e)})
    row_of = {r.id: row for r, row in zip(records, rows)}
    fmt.write_block(out, data, [r.id for r in records], rows, [row_of[i] for i in data.ids])
    return fmt.BlockResult(block.index, len(records), None, data.summary.as_dict())


# --------------------------------------------------------------------------------------------
# The build

def _workers(requested: int | None, blocks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(requested or cores or 1, blocks))


def _duplicate_error(build_dir: Path, blocks: list[Block], files: list[Path],
                     reads: list[int]) -> str | None:
    """The first record, in data order, whose id an earlier record already had (reads[i]:
    records block i read), worded as the unprepared reader words it; None when ids are
    unique."""
    hashes, rows, owner = [], [], []
    for b, n in zip(blocks, reads):
        h, r = fmt.block_read_ids(block_path(build_dir, b.index))
        hashes.append(h[:n])
        rows.append(r[:n])
        owner.append(np.full(len(h[:n]), len(owner), np.int64))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    if not len(h):
        return None
    rows, owner = np.concatenate(rows), np.concatenate(owner)
    starts = np.cumsum([0] + [len(x) for x in hashes])
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]
    repeats = np.flatnonzero(first_of != np.arange(len(h)))
    if not len(repeats):
        return None

    def describe(pos: int) -> tuple[str, str]:
        k = int(owner[pos])
        rid = fmt.block_read_id(block_path(build_dir, blocks[k].index), pos - int(starts[k]))
        return rid, location(files[blocks[k].file_index], int(rows[pos]), rid)

    for later in repeats.tolist():
        (rid, where), (rid0, where0) = describe(later), describe(int(first_of[later]))
        if rid == rid0:  # else two ids whose 64-bit hashes collide: not a duplicate
            return f"{where}: duplicate id {rid!r} (first seen at {where0})"
    return None


def _build(root: Path, name: str, key: dict, settings: Settings, files: list[Path],
           workers: int | None, progress: bool) -> Path:
    """Build (or resume building) the prepared directory root/name; returns it."""
    build_dir = root / f".{name}.build"
    build_dir.mkdir(parents=True, exist_ok=True)
    # What killed builders left half-written: block temporaries, unpublished directories.
    runtime_files.remove_stale(build_dir, runtime_files.STALE_FILE)
    runtime_files.remove_stale(root, rf"^\.{name}\.tmp-(?P<owner>.+-\d+)$")
    plan_file = build_dir / "blocks.json"
    if plan_file.is_file():
        blocks = [Block(b["index"], b["file_index"], Span(**b["span"]) if b["span"] else None)
                  for b in json.loads(plan_file.read_text())]
    else:
        blocks = split_blocks(files)
        runtime_files.atomic_write_text(plan_file, json.dumps([asdict(b) for b in blocks]))
    done_file = build_dir / "done.jsonl"  # results of finished blocks, one JSON line each
    done: dict[int, fmt.BlockResult] = {}
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            try:
                r = fmt.BlockResult(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a torn last line of a killed build
            if r.error is None and block_path(build_dir, r.index).is_file():
                done[r.index] = r
    todo = [b for b in blocks if b.index not in done]
    n_workers = _workers(workers, len(todo))
    t0 = time.time()
    log.info("preparing %s: %d blocks (%d done before), %d worker process(es) -> %s",
             ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else ""),
             len(blocks), len(done), n_workers, root / name)
    pool, failed = None, None
    try:
        if n_workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(n_workers, initializer=_init_worker,
                            initargs=(settings, files, build_dir, True))
            fresh = pool.imap_unordered(_build_block, todo)
        else:
            _init_worker(settings, files, build_dir, False)
            fresh = map(_build_block, todo)
        results = _collect(blocks, done, fresh, done_file, progress)
        failed = _first_error(build_dir, blocks, files, results)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if failed is not None:
        # Any fix (data, tokenizer, template, code) changes the key: these blocks are dead.
        shutil.rmtree(build_dir, ignore_errors=True)
        raise DataError(failed)
    seconds = time.time() - t0
    publish = runtime_files.temp_dir_path(root / name)
    shutil.rmtree(publish, ignore_errors=True)
    meta = fmt.merge_blocks(
        publish, settings.kind, [(block_path(build_dir, b.index), b.file_index) for b in blocks],
        [r.summary for r in results], settings.seq_length,
        {"key": key, "files": [f.name for f in files], "blocks": len(blocks),
         "workers": n_workers, "tokenise_seconds": round(seconds, 3),
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    final = root / name
    try:
        runtime_files.publish_dir(publish, final)
    except OSError:
        if fmt.read_meta(final) is None:
            raise
        shutil.rmtree(publish, ignore_errors=True)  # another node published the same content
    shutil.rmtree(build_dir, ignore_errors=True)
    log.info("prepared %d of %d records (%s) in %.1f s -> %s", meta["summary"]["used"],
             meta["summary"]["records"], meta["summary"]["dropped"] or "none dropped",
             time.time() - t0, final)
    return final


def _collect(blocks: list[Block], done: dict, fresh, done_file: Path,
             progress: bool) -> list[fmt.BlockResult]:
    """Block results in block order, journalling each finished block as it arrives (so a kill
    loses only blocks in flight). Stops at the first block that could not be read: nothing
    after it matters."""
    from tqdm import tqdm

    pending: dict[int, fmt.BlockResult] = {}
    results = []
    if done_file.is_file() and not done_file.read_bytes().endswith(b"\n"):
        with open(done_file, "ab") as f:
            f.write(b"\n")  # after a torn line
    # A bar on a terminal; elsewhere (Slurm and pipeline logs) a plain line per ~10%.
    bar = tqdm(total=len(blocks), initial=len(done), desc="avr prepare", unit="block",
               disable=not (progress and sys.stderr.isatty()))
    every, finished, t0 = max(1, len(blocks) // 10), len(done), time.time()
    with open(done_file, "a") as journal:
        for b in blocks:
            while b.index not in done and b.index not in pending:
                r = next(fresh)
                bar.update(1)
                finished += 1
                if progress and bar.disable and (finished % every == 0
                                                 or finished == len(blocks)):
                    log.info("avr prepare: %d/%d blocks (%.0f s)", finished, len(blocks),
                             time.time() - t0)
                if r.error is None:
                    journal.write(json.dumps(asdict(r)) + "\n")
                    journal.flush()
                pending[r.index] = r
            r = done.get(b.index) or pending.pop(b.index)
            results.append(r)
            if r.error and r.error["stage"] == "read":
                break
    bar.close()
    return results


def _first_error(build_dir: Path, blocks: list[Block], files: list[Path],
                 results: list[fmt.BlockResult]) -> str | None:
    """What the unprepared path would raise: the first unreadable record or repeated id (in
    data order), else the first record that cannot be tokenised; None when all is well."""
    dup = _duplicate_error(build_dir, blocks[:len(results)], files, [r.records for r in results])
    if dup:
        return dup
    for r in results:
        if r.error:
            return r.error["message"]
    return None


def _open_locked(path: Path, operation: int) -> int | None:
    """An fd of `path` holding flock `operation` (LOCK_EX / LOCK_SH, | LOCK_NB to try), or None
    when LOCK_NB found it held. Retries when the file was unlinked or replaced while waiting (a
    pruner removes lock files while it holds them), so the lock held is always on the file that
    `path` names now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class _FileLock:
    """Exclusive flock on `path` (released by the kernel if the holder dies)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.fd = _open_locked(self.path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self.fd is None:
            try:
                holder = self.path.read_text(errors="replace").strip()
            except OSError:
                holder = ""
            log.info("waiting for %s to finish preparing data (%s)", holder or "another process",
                     self.path)
            self.fd = _open_locked(self.path, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# --------------------------------------------------------------------------------------------
# In use, and pruning stale versions

# Prepared directories this process maps -> the fd holding their shared "in use" lock, kept
# open for the life of the process (the kernel drops the lock when the process dies).
_IN_USE: dict[Path, int] = {}


def _use_lock(root: Path, name: str) -> Path:
    return root / f".{name}.use"


def _build_lock(root: Path, name: str) -> Path:
    return root / f".{name}.lock"


def _mark_in_use(root: Path, name: str) -> bool:
    """Hold a shared lock on root/.<name>.use for the life of this process, so that
    `prune_prepared` never removes a version a process maps. False when the version was pruned
    before the lock was taken (the caller builds it again). Where the lock file cannot be
    created (read-only prepared data), nothing can prune it either: True."""
    final = root / name
    if final in _IN_USE:
        return True
    try:
        fd = _open_locked(_use_lock(root, name), fcntl.LOCK_SH)
    except OSError:
        return fmt.read_meta(final) is not None
    if fmt.read_meta(final) is None:  # pruned between finding it and locking it
        os.close(fd)
        return False
    _IN_USE[final] = fd
    return True


def release(directory: Path | None = None) -> None:
    """Stop holding `directory` (every prepared directory when None) in use: for a long-lived
    process that no longer maps it (tests, notebooks)."""
    for path in [Path(directory)] if directory is not None else list(_IN_USE):
        fd = _IN_USE.pop(path, None)
        if fd is not None:
            os.close(fd)


def prune_prepared(root: Path, keep: Sequence[str] = (), keep_newest: int = 0,
                   dry_run: bool = False) -> list[dict]:
    """Remove the prepared versions under `root` except those named in `keep` (this recipe's
    keys) and the `keep_newest` most recently built others, and unfinished builds of other
    keys that nobody is running. A version some process maps (its shared `.use` lock is held)
    or is building or waiting for (its `.lock` is held) is left alone and reported "in use".
    Returns one row per version: name, created, bytes, action (kept | removed | in use, or
    "would remove" with dry_run)."""
    root = Path(root)
    if not root.is_dir():
        return []
    versions, builds = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            meta = fmt.read_meta(entry)
            if meta is not None:
                versions.append((meta.get("created", ""), entry.name))
        elif entry.is_dir() and entry.name.startswith(".") and entry.name.endswith(".build"):
            builds.append(entry.name[1:-len(".build")])
    versions.sort(reverse=True)  # newest first (ISO times)
    rows, others = [], 0
    for created, name in versions:
        row = {"name": name, "created": created, "bytes": _size(root / name)}
        if name in keep:
            row["action"] = "kept"
        elif others < keep_newest:
            others += 1
            row["action"] = "kept"
        else:
            row["action"] = _remove_version(root, name, dry_run)
        rows.append(row)
    for name in builds:
        if name in keep or (root / name).is_dir():
            continue
        rows.append({"name": f".{name}.build", "created": None, "bytes": _size(root / f".{name}.build"),
                     "action": _remove_version(root, name, dry_run, build_only=True)})
    return rows


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove_version(root: Path, name: str, dry_run: bool, build_only: bool = False) -> str:
    """Remove root/name (or its unfinished build) unless a process holds its use or build lock;
    both are held (exclusively) across the removal, so no process starts mapping or building
    it meanwhile."""
    held = []
    try:
        for lock in (_build_lock(root, name), _use_lock(root, name)):
            fd = _open_locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                return "in use"
            held.append((lock, fd))
        if dry_run:
            return "would remove"
        if not build_only:
            # Out of sight in one rename (a reader checks read_meta after taking its lock),
            # then deleted; a kill mid-delete leaves a temporary that remove_stale clears.
            doomed = runtime_files.temp_dir_path(root / name)
            os.rename(root / name, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(root / f".{name}.build", ignore_errors=True)
        for lock, _ in held:
            lock.unlink(missing_ok=True)
        return "removed"
    finally:
        for _, fd in held:
            os.close(fd)


def ensure_prepared(root: Path, key: dict, settings: Settings, files: list[Path], *,
                    build: bool, workers: int | None = None, progress: bool = False) -> Path:
    """The prepared directory for `key` under root, built first when missing (build=True)
    or a DataError saying how to build it (build=False). This process then holds it "in use"
    (see prune_prepared) until it exits."""
    name = key_name(key)
    final = root / name
    for _ in range(3):
        if fmt.read_meta(final) is None:
            _build_once(root, name, key, settings, files, build=build, workers=workers,
                        progress=progress)
        if _mark_in_use(root, name):
            return final
    raise DataError(f"{final}: removed by `avr prepare --prune` three times while this process "
                    "was starting; run the prune when no job starts on this data")


def _build_once(root: Path, name: str, key: dict, settings: Settings, files: list[Path], *,
                build: bool, workers: int | None, progress: bool) -> None:
    final = root / name
    if not build:
        raise DataError(f"no prepared data for these inputs at {final} (data.prepared=required):"
                        " run `avr prepare` with the same recipe first, or set "
                        "data.prepared=auto")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = _FileLock(_build_lock(root, name))
    except OSError as e:
        raise DataError(f"cannot write prepared data under {root} ({e.strerror}): set "
                        "data.prepared_dir to a writable directory, or data.prepared=in_memory")
    with lock:
        if fmt.read_meta(final) is None:  # else built by the process we waited for
            _build(root, name, key, settings, files, workers, progress)
