"""Atomic writes and stale temporaries: what a killed process leaves is recognised and removed,
a live process's temporaries (and other hosts') are left alone."""

import os
import stat
import subprocess
import sys

from avr_megatron.runtime import files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_mode_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        path = files.atomic_write_text(tmp_path / "a" / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_only_dead_local_owners_are_stale(tmp_path):
    host = files.owner_tag().rsplit("-", 1)[0]
    dead, alive = _dead_pid(), os.getppid()
    names = {f".x.json.{host}-{dead}.tmp": True, f".y.parquet.{dead}.tmp": True,  # bare pid: older
             f".x.json.{host}-{alive}.tmp": False, f".x.json.{host}-{os.getpid()}.tmp": False,
             f".x.json.otherhost-{dead}.tmp": False, "x.json": False, ".x.json": False}
    for name in names:
        (tmp_path / name).write_text("partial")
    removed = files.remove_stale(tmp_path, files.STALE_FILE)
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, s in names.items() if not s)


def test_recycled_pid_is_stale(tmp_path):
    """A pid now used by a process that started after the temporary was last written."""
    host = files.owner_tag().rsplit("-", 1)[0]
    tmp = tmp_path / f".x.json.{host}-{os.getppid()}.tmp"
    tmp.write_text("partial")
    os.utime(tmp, (1, 1))  # written in 1970, long before our parent started
    assert [p.name for p in files.remove_stale(tmp_path, files.STALE_FILE)] == [tmp.name]


def test_write_permission_errors_are_storage_problems_reads_are_not(tmp_path, monkeypatch):
    import errno

    import pytest

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", args[0])

    monkeypatch.setattr(files.os, "open", denied)
    with pytest.raises(PermissionError) as e:
        files.atomic_write_text(tmp_path / "config.yaml", "x")
    monkeypatch.undo()
    assert e.value.filename == str(tmp_path / "config.yaml")  # the file, not our temporary
    err = files.storage_error(e.value.filename, e.value, kept="k", probe=False)
    assert str(err).startswith(f"cannot write {tmp_path / 'config.yaml'}: the directory is not writable")
    read = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data.jsonl"))
    assert files.storage_error(read.filename, read, kept="k", probe=False) is None


def test_atomic_file_any_writer_all_or_nothing(tmp_path):
    """A library writer (here: plain open) writes the temporary; an error keeps the old file."""
    path = tmp_path / "t.jsonl"
    path.write_text("old\n")
    try:
        with files.atomic_file(path) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("writer failed")
    except RuntimeError:
        pass
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]
    with files.atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_atomic_write_json_format(tmp_path):
    path = files.atomic_write_json(tmp_path / "s.json", {"b": "é", "a": 1})
    assert path.read_text() == '{\n  "b": "é",\n  "a": 1\n}\n'


def test_publish_dir(tmp_path):
    build = files.temp_dir_path(tmp_path / "out")
    build.mkdir()
    (build / "x").write_text("1")
    final = files.publish_dir(build, tmp_path / "out")
    assert (final / "x").read_text() == "1" and not build.exists()
