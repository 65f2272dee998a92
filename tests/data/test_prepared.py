"""Prepared (memory-mapped) data: exactly the examples, plan and batches of the in-memory path,
the same errors for bad records, stale versions never used, one builder at a time, resumable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import avr_megatron.data.prepare as prepare
from avr_megatron.config import load_config
from avr_megatron.data.batches import collate
from avr_megatron.data.dataset import load_training_data
from avr_megatron.data.records import DataError
from avr_megatron.testing.toy_data import preference_records, sft_records

from .conftest import write_jsonl


def _long(records, every=7, words=60):
    """Make some records over-long, so drops/truncations are counted."""
    for i, r in enumerate(records):
        if i % every == 3:
            if "chosen" in r:
                r["chosen"][0]["content"] += " good" * words
            else:
                r["messages"][-1]["content"] += " yes" * words
    return records


def _cfg(tmp_path, train, tok, *extra):
    return load_config(None, [f"data.train={train}", f"data.tokenizer={tok}",
                              f"run.dir={tmp_path / 'run'}", "train.seq_length=96",
                              "model.vocab_size=384", "train.global_batch_size=2", *extra])


def _same_batches(a, b):
    assert a.data.fingerprint() == b.data.fingerprint()
    assert a.data.summary.as_dict() == b.data.summary.as_dict()
    assert list(a.data.ids) == list(b.data.ids)
    assert [a.data.where(u) for u in range(len(a.data))] == \
        [b.data.where(u) for u in range(len(b.data))]
    assert [a.data.example_hash(u) for u in range(len(a.data))] == \
        [b.data.example_hash(u) for u in range(len(b.data))]
    for name in ("units", "offsets", "fill"):
        assert np.array_equal(getattr(a.plan, name), getattr(b.plan, name))
    bins = list(range(a.plan.num_bins))
    x = collate(a.data, a.plan, bins, a.chat.pad_id)
    y = collate(b.data, b.plan, bins, b.chat.pad_id)
    for k, v in vars(x).items():
        w = getattr(y, k)
        assert (v is None and w is None) or v.equal(w), k


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(prepare, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(prepare, "BLOCK_ROWS", 16)


@pytest.mark.parametrize("kind,overlong,workers", [("preference", "truncate", 2),
                                                    ("preference", "drop", 1),
                                                    ("sft", "truncate", 2)])
def test_prepared_equals_in_memory(tmp_path, tokenizer_dir, small_blocks, kind, overlong,
                                   workers):
    recs = _long(preference_records(120) if kind == "preference" else sft_records(120))
    train = write_jsonl(tmp_path / "d.jsonl", recs)
    extra = [f"data.overlong={overlong}", f"data.prepare_workers={workers}"]
    memory = load_training_data(_cfg(tmp_path, train, tokenizer_dir, *extra,
                                     "data.prepared=in_memory"), kind)
    assert memory.prepared is None
    assert sum(memory.data.summary.dropped.values()) + memory.data.summary.truncated > 0
    built = load_training_data(_cfg(tmp_path, train, tokenizer_dir, *extra), kind)
    meta = json.loads((built.prepared / "meta").read_text())
    assert meta["blocks"] > 4 and meta["workers"] == workers
    assert built.prepared.parent == tmp_path / "d.jsonl.prepared"
    mapped = load_training_data(_cfg(tmp_path, train, tokenizer_dir, *extra,
                                     "data.prepared=required"), kind)
    assert isinstance(mapped.data.tokens, np.memmap)
    for other in (built, mapped):
        _same_batches(memory, other)
    assert not list(built.prepared.parent.glob(".*.build"))  # build files cleaned up
    unpacked = load_training_data(_cfg(tmp_path, train, tokenizer_dir, *extra,
                                       "data.pack=false"), kind)
    assert unpacked.plan.num_bins == len(unpacked.data)


def test_parquet_shards_and_row_groups(tmp_path, tokenizer_dir, small_blocks):
    recs = _long(preference_records(90))
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(recs[k::2]), d / f"part-{k}.parquet",
                       row_group_size=20)
    memory = load_training_data(_cfg(tmp_path, d, tokenizer_dir, "data.prepared=in_memory",
                                     "data.overlong=truncate"), "preference")
    mapped = load_training_data(_cfg(tmp_path, d, tokenizer_dir, "data.overlong=truncate"),
                                "preference")
    assert mapped.prepared.parent == tmp_path / "shards.prepared"
    assert "record 45" in mapped.data.where(len(mapped.data) - 1)
    _same_batches(memory, mapped)


def test_stale_versions_are_never_used(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(30))
    first = load_training_data(_cfg(tmp_path, train, tokenizer_dir), "preference")
    again = load_training_data(_cfg(tmp_path, train, tokenizer_dir), "preference")
    assert again.prepared == first.prepared
    other_length = load_training_data(_cfg(tmp_path, train, tokenizer_dir,
                                           "train.seq_length=80"), "preference")
    other_rule = load_training_data(_cfg(tmp_path, train, tokenizer_dir,
                                         "data.overlong=truncate"), "preference")
    recs = preference_records(30)
    recs[5]["chosen"][0]["content"] = "edited."
    write_jsonl(train, recs)
    edited = load_training_data(_cfg(tmp_path, train, tokenizer_dir), "preference")
    dirs = {first.prepared, other_length.prepared, other_rule.prepared, edited.prepared}
    assert len(dirs) == 4
    memory = load_training_data(_cfg(tmp_path, train, tokenizer_dir, "data.prepared=in_memory"),
                                "preference")
    _same_batches(memory, edited)
    with pytest.raises(DataError, match="data.prepared=required"):
        recs[6]["chosen"][0]["content"] = "edited too."
        write_jsonl(train, recs)
        load_training_data(_cfg(tmp_path, train, tokenizer_dir, "data.prepared=required"),
                           "preference")


def _error(cfg, kind="preference"):
    with pytest.raises(DataError) as e:
        load_training_data(cfg, kind)
    return str(e.value)


@pytest.mark.parametrize("case", ["missing_field", "dup_across_blocks", "dup_within_block",
                                  "bad_json", "dup_before_bad_row", "no_gap"])
def test_bad_records_same_errors(tmp_path, tokenizer_dir, small_blocks, case):
    recs = preference_records(80)
    extra = ["data.prepare_workers=2"]
    if case == "missing_field":
        del recs[57]["rejected"]
    elif case == "dup_across_blocks":
        recs[70]["id"] = recs[2]["id"]
    elif case == "dup_within_block":
        recs[41]["id"] = recs[40]["id"]
    elif case == "dup_before_bad_row":
        recs[30]["id"] = recs[1]["id"]
        recs[60]["prompt"] = "not a list"
    elif case == "no_gap":
        for k in ("reward_gap", "reward_chosen"):
            del recs[66][k]
        extra.append("loss.reward_gap=margin")
    train = write_jsonl(tmp_path / "d.jsonl", recs)
    if case == "bad_json":
        lines = train.read_text().splitlines()
        lines[50] = lines[50][:-3]
        train.write_text("\n".join(lines) + "\n")
    want = _error(_cfg(tmp_path, train, tokenizer_dir, "data.prepared=in_memory", *extra))
    got = _error(_cfg(tmp_path, train, tokenizer_dir, *extra))
    assert got == want and str(train) in got
    if case != "no_gap":  # the data is bad: nothing is kept for it
        assert not list((tmp_path / "d.jsonl.prepared").glob("*/meta"))
        assert not list((tmp_path / "d.jsonl.prepared").glob(".*.build"))


def test_vocab_check_and_no_usable_example(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(10))
    for mode in ("in_memory", "auto"):
        with pytest.raises(DataError, match="model.vocab_size=100"):
            load_training_data(_cfg(tmp_path, train, tokenizer_dir, f"data.prepared={mode}",
                                    "model.vocab_size=100"), "preference")


def test_resume_after_interruption(tmp_path, tokenizer_dir, small_blocks, monkeypatch):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(100))
    calls = []
    real = prepare._build_block

    def interrupted(block):
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for a kill between blocks
        calls.append(block.index)
        return real(block)

    monkeypatch.setattr(prepare, "_build_block", interrupted)
    cfg = _cfg(tmp_path, train, tokenizer_dir, "data.prepare_workers=1")
    with pytest.raises(KeyboardInterrupt):
        load_training_data(cfg, "preference")
    (build,) = (tmp_path / "d.jsonl.prepared").glob(".*.build")
    assert len((build / "done.jsonl").read_text().splitlines()) == 5
    with open(build / "done.jsonl", "a") as f:
        f.write('{"index": 5, "rec')  # a torn line from a kill mid-write
    done_before = list(calls)
    calls.clear()
    monkeypatch.setattr(prepare, "_build_block", lambda b: calls.append(b.index) or real(b))
    resumed = load_training_data(cfg, "preference")
    assert set(calls).isdisjoint(done_before) and min(calls) == 5
    memory = load_training_data(_cfg(tmp_path, train, tokenizer_dir, "data.prepared=in_memory"),
                                "preference")
    _same_batches(memory, resumed)


_LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import avr_megatron.data.prepare as prepare
prepare.BLOCK_BYTES = 2048
from avr_megatron.config import load_config
from avr_megatron.data.dataset import load_training_data
cfg = load_config(None, sys.argv[1:])
td = load_training_data(cfg, "preference")
print("MAPPED", td.prepared, td.data.fingerprint())
"""


def _overrides(tmp_path, train, tok):
    return [f"data.train={train}", f"data.tokenizer={tok}", f"run.dir={tmp_path / 'run'}",
            "train.seq_length=96", "model.vocab_size=384", "data.prepare_workers=2"]


@pytest.mark.slow
def test_one_builder_others_wait(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(400))
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD,
                               *_overrides(tmp_path, train, tokenizer_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [line for o in outs for line in o.splitlines()]
    assert sum(line.startswith("preparing ") for line in lines) == 1  # one process tokenised
    assert len({line for line in lines if line.startswith("MAPPED")}) == 1


@pytest.mark.slow
def test_kill_9_mid_build_resumes_and_leaves_no_worker(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "d.jsonl", preference_records(3000))
    args = [sys.executable, "-c", _LOAD, *_overrides(tmp_path, train, tokenizer_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "d.jsonl.prepared"
    deadline = time.time() + 120
    journal = None
    while time.time() < deadline:
        found = list(root.glob(".*.build/done.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            journal = found[0]
            break
        time.sleep(0.05)
    assert journal is not None, "the build never finished a block"
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    alive = [c for c in children if Path(f"/proc/{c}").exists()
             and "zombie" not in Path(f"/proc/{c}/status").read_text().lower()]
    assert children and not alive  # workers die with the builder
    assert not list(root.glob("*/meta"))
    out = subprocess.run(args, capture_output=True, text=True, timeout=300).stdout
    before = int(out.split(" blocks (")[1].split(" done before")[0])
    assert before >= 3
    memory = load_training_data(load_config(None, [
        *_overrides(tmp_path, train, tokenizer_dir), "data.prepared=in_memory"]), "preference")
    assert f"MAPPED {next(root.glob('*/meta')).parent} {memory.data.fingerprint()}" in out
