"""Pruning stale prepared-data versions: other keys' versions go (except the newest N), never one a
process maps or builds; a version pruned while a process was starting on it is built again."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import avr_megatron.data.prepare as prepare
from avr_megatron.cli.main import main
from avr_megatron.config import load_config
from avr_megatron.data.dataset import load_training_data
from avr_megatron.data.prepared import META, read_meta
from avr_megatron.testing.toy_data import preference_records

from .conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _overrides(tmp_path, train, tok, length):
    return [f"data.train={train}", f"data.tokenizer={tok}", f"run.dir={tmp_path / 'run'}",
            f"train.seq_length={length}", "model.vocab_size=384", "train.global_batch_size=2"]


def _versions(tmp_path, tokenizer_dir, lengths):
    """Prepared versions (one per seq_length) of one data file, built in this process and then
    released (as if built by jobs that have finished)."""
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(20))
    paths = [load_training_data(load_config(None, _overrides(tmp_path, train, tokenizer_dir, n)),
                                "preference").prepared for n in lengths]
    for p in paths:
        prepare.release(p)
    return train, paths


def test_prune_keeps_current_newest_and_in_use(tmp_path, tokenizer_dir):
    train, (a, b, c, d) = _versions(tmp_path, tokenizer_dir, [96, 88, 80, 72])
    root = a.parent
    # Oldest first: a, b, c, d (created timestamps have one-second resolution).
    for i, p in enumerate((a, b, c, d)):
        meta_file = p / META
        meta = json.loads(meta_file.read_text())
        meta["created"] = f"2026-01-0{i + 1}T00:00:00+0000"
        meta_file.write_text(json.dumps(meta))
    # Another process maps b: its shared lock (a second open file description) is held.
    fd = os.open(root / f".{b.name}.use", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        dry = {r["name"]: r["action"] for r in prepare.prune_prepared(root, [a.name], 1, dry_run=True)}
        assert dry == {a.name: "kept", d.name: "kept", b.name: "in use", c.name: "would remove"}
        assert all(read_meta(p) for p in (a, b, c, d))
        rows = {r["name"]: r for r in prepare.prune_prepared(root, [a.name], keep_newest=1)}
        assert {n: r["action"] for n, r in rows.items()} == dry | {c.name: "removed"}
        assert rows[c.name]["bytes"] > 0
        assert not c.exists() and read_meta(a) and read_meta(b) and read_meta(d)
    finally:
        os.close(fd)
    assert {r["name"]: r["action"] for r in prepare.prune_prepared(root, [a.name])} == \
        {a.name: "kept", b.name: "removed", d.name: "removed"}
    # Nothing of the removed versions is left: no lock files, builds or temporaries.
    assert sorted(p.name for p in root.iterdir()) == sorted([a.name, f".{a.name}.lock", f".{a.name}.use"])
    # This process maps a version again: pruning with another key to keep leaves it in place.
    again = load_training_data(load_config(None, _overrides(tmp_path, train, tokenizer_dir, 96)),
                               "preference")
    assert again.prepared == a
    assert [r["action"] for r in prepare.prune_prepared(root, [])] == ["in use"]
    prepare.release(a)


def test_pruned_while_starting_is_built_again(tmp_path, tokenizer_dir, monkeypatch):
    train, (a,) = _versions(tmp_path, tokenizer_dir, [96])
    real = prepare._mark_in_use
    pruned = []

    def prune_first(root, name):  # the prune lands between finding the version and locking it
        if not pruned:
            pruned.append(prepare.prune_prepared(root, [])[0]["action"])
        return real(root, name)

    monkeypatch.setattr(prepare, "_mark_in_use", prune_first)
    td = load_training_data(load_config(None, _overrides(tmp_path, train, tokenizer_dir, 96)), "preference")
    assert pruned == ["removed"] and td.prepared == a and read_meta(a) is not None
    prepare.release(a)


def test_cli_prune_keeps_this_recipes_versions(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    train, (old,) = _versions(tmp_path, tokenizer_dir, [88])
    args = ["prepare", "--recipe", "recipes/tiny.yaml", f"data.train={train}",
            f"data.tokenizer={tokenizer_dir}", f"run.dir={tmp_path / 'run'}", "train.seq_length=96",
            "model.vocab_size=384"]
    assert main(args + ["--prune", "--keep", "1"]) == 0
    assert read_meta(old) is not None  # kept: the newest other version
    rows = json.loads((tmp_path / "run" / "prepare_summary.json").read_text())
    assert [(r["name"], r["action"]) for r in rows[0]["pruned"]] == [(old.name, "kept")]
    assert main(args + ["--prune"]) == 0
    assert "avr prepare --prune: removed: " in capsys.readouterr().out and not old.exists()
    current = Path(rows[0]["prepared"])
    assert read_meta(current) is not None
    prepare.release(current)


_HOLD = """
import sys
from avr_megatron.config import load_config
from avr_megatron.data.dataset import load_training_data
td = load_training_data(load_config(None, sys.argv[1:]), "preference")
print("MAPPED", td.prepared, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_version_another_process_maps_is_kept_until_it_exits(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(20))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, *_overrides(tmp_path, train, tokenizer_dir, 96)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MAPPED"), line
        held = Path(line.split()[1])
        assert [r["action"] for r in prepare.prune_prepared(held.parent, [])] == ["in use"]
        proc.kill()  # kill -9: the kernel drops its lock
        proc.wait()
        assert [r["action"] for r in prepare.prune_prepared(held.parent, [])] == ["removed"]
        assert not held.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
