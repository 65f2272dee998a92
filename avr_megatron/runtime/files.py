"""Files that appear whole or not at all, and the temporaries a killed process leaves behind.

A temporary is a hidden sibling named after its owner, `.NAME.<host>-<pid>.tmp` (directories:
`.NAME.tmp-<host>-<pid>`), so any later process can tell a live writer's temporary from a dead
one's: it is stale when it was made on this host by a process that no longer runs (or whose pid
now belongs to a process started after the temporary was last written). Temporaries made on
other hosts (a shared filesystem) are never touched.

Files are created with mode 0666 minus the umask, like any file `open()` creates (0644 under the
usual umask 022), so teammates can read configs and checkpoints; `tempfile.mkstemp` would give
0600. Standard library only: synthesis (no torch, no Megatron) uses it too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_OWNER = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)$")


def _host() -> str:
    """This host's name without dots (so `<owner>` never contains one and names parse)."""
    return socket.gethostname().replace(".", "_").replace("/", "_") or "localhost"


def owner_tag() -> str:
    """`<host>-<pid>` of this process."""
    return f"{_host()}-{os.getpid()}"


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temporary sibling this process writes `path` through."""
    path = Path(path)
    return path.parent / f".{path.name}.{owner_tag()}.tmp"


def temp_dir_path(path: str | os.PathLike) -> Path:
    """The hidden temporary directory this process builds directory `path` in."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{owner_tag()}"


def _process_start(pid: int) -> float | None:
    """Start time of `pid` as a Unix time (Linux /proc), or None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after the command name
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def owner_is_dead(owner: str, written_at: float) -> bool:
    """Is the `<host>-<pid>` (or bare `<pid>`, older names) that owns a temporary last written at
    `written_at` gone? Other hosts' owners are never declared dead."""
    if owner.isdigit():
        host, pid = _host(), int(owner)
    else:
        m = _OWNER.match(owner)
        if m is None:
            return False
        host, pid = m.group("host"), int(m.group("pid"))
    if host != _host():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    # A pid recycled by a process that started after the temporary was last written.
    return started is not None and started > written_at + 1.0


def remove_stale(directory: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove the temporaries matching the regex `pattern` (full name; its group `owner` is the
    `<host>-<pid>`) in `directory` whose owner is dead. Returns what was removed."""
    directory, rx = Path(directory), re.compile(pattern)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = rx.match(entry.name)
        if m is None:
            continue
        try:
            written = entry.lstat().st_mtime
        except OSError:
            continue
        if not owner_is_dead(m.group("owner"), written):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# `.NAME.<owner>.tmp` files written by `atomic_write_*` (any NAME; bare-pid owners: older names).
STALE_FILE = r"^\..+\.(?P<owner>[^.]+-\d+|\d+)\.tmp$"


def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, *, sync: bool = True) -> Iterator[Path]:
    """The temporary sibling (`temp_path`) to write `path` through, with any writer (pyarrow,
    torch.save, a stream of lines): when the block ends without error it is fsynced (`sync`) and
    renamed to `path`, and the directory entry synced; on any error (Ctrl-C included) it is
    removed and `path` is left as it was. Files get mode 0666 minus the umask (no project file
    is secret)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            if e.filename is not None and os.fspath(e.filename) == str(tmp):
                e = type(e)(e.errno, e.strerror, str(path))  # name the file, not our temp
            e.during_write = True  # a permission error here is about writing (storage_problem)
            raise e from None
        raise
    if sync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> Path:
    """Write `data` to `path` atomically (see atomic_file)."""
    with atomic_file(path, sync=sync) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, sync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), sync=sync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sync: bool = True) -> Path:
    """`obj` as indented UTF-8 JSON (non-ASCII kept as is) with a final newline, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                             sync=sync)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish the finished directory `tmp` as `final` (which must not exist) by one rename, then
    sync the parent's entry so the rename survives a crash. The files inside are as durable as
    their writers made them (DCP and the converters sync their own)."""
    final = Path(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


# ---------------------------------------------------------------- storage faults

class StorageError(RuntimeError):
    """A write failed because of the storage (full, read-only, ...): the message names the path,
    the problem, what was kept and how to resume. Commands exit with EXIT_STORAGE."""


EXIT_STORAGE = 74  # EX_IOERR

_ERRNO_PROBLEMS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file size limit is reached (ulimit -f)",
}
# What a probe write can also tell (an errno that, on its own, may come from a read).
_PROBE_PROBLEMS = {**_ERRNO_PROBLEMS,
                   errno.EACCES: "the directory is not writable (permission denied)",
                   errno.EPERM: "the directory is not writable (operation not permitted)"}


def _errno_problem(error: BaseException | None) -> str | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ERRNO_PROBLEMS:
            return _ERRNO_PROBLEMS[error.errno]
        if isinstance(error, OSError) and getattr(error, "during_write", False):
            return _PROBE_PROBLEMS.get(error.errno)
        error = error.__cause__ or error.__context__
    return None


def storage_problem(path: str | os.PathLike, error: BaseException | None = None, *,
                    probe: bool = True) -> str | None:
    """What is wrong with the storage under `path`, or None. The error's errno decides when it
    has one; otherwise, with `probe` (for failures of our own writes into `path`: C++ writers
    such as torch.save report a short write as "unexpected pos"), the file system is probed:
    read-only flag, then a 1 MiB write next to `path`. Call it before removing partial output
    (which frees space)."""
    problem = _errno_problem(error)
    if problem is not None or not probe:
        return problem
    directory = Path(path)
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return _ERRNO_PROBLEMS[errno.EROFS]
    except OSError:
        return None
    probe_file = directory / f".avr-space-probe.{owner_tag()}.tmp"
    try:
        fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * (1 << 20))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return _PROBE_PROBLEMS.get(e.errno)
    finally:
        try:
            probe_file.unlink()
        except OSError:
            pass
    return None


def describe_error(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line; DCP's per-rank wrapper (CheckpointException) is unwrapped to
    the first failing rank's own error."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    text = " ".join(str(error).split()) or ("a file ends early (truncated)"
                                            if isinstance(error, EOFError) else "no message")
    return f"{type(error).__name__}: {text[:limit]}"


def storage_error(path: str | os.PathLike, error: BaseException | None, *, kept: str,
                  resume: str = "free space (or make it writable) and rerun the same command",
                  probe: bool = True) -> StorageError | None:
    """A StorageError for a failed write of `path`, or None when the storage is fine (then the
    original error stands). `probe`: see storage_problem."""
    problem = storage_problem(path, error, probe=probe)
    if problem is None:
        return None
    cause = "" if error is None else f" [{describe_error(error)}]"
    return StorageError(f"cannot write {path}: {problem}{cause}. Kept: {kept}. "
                        f"To resume: {resume}.")
