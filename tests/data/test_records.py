"""Records are read from JSONL, Parquet, shard directories and globs; bad ones are reported with
file, record and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avr_megatron.data.records import DataError, read_preferences, read_sft, resolve_files

U = {"role": "user", "content": "Question?"}
A = {"role": "assistant", "content": "Answer."}


def pair(i, **extra):
    return {"id": f"p{i}", "prompt": [U], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], "pair_type": "response",
            "reward_chosen": 2.0, "reward_rejected": 0.5, **extra}


def test_sft_jsonl_parquet_and_directory(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"id": "a", "messages": [U, A], "kind": "rsft"}) + "\n\n")
    pq.write_table(pa.Table.from_pylist([{"id": "b", "messages": [U, A]}]), d / "b.parquet")
    (d / ".hidden.jsonl").write_text("not json\n")
    recs = read_sft(d)
    assert [r.id for r in recs] == ["a", "b"]
    assert recs[0].messages == (U, A)
    assert [f.name for f in resolve_files(str(d / "*.parquet"))] == ["b.parquet"]


def test_preferences_gap_from_rewards_and_string_completion(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(pair(0)) + "\n" + json.dumps(
        {"id": "p1", "prompt": [U], "chosen": "yes", "rejected": "no", "reward_gap": 0.25}) + "\n"
        + json.dumps({"id": "p2", "prompt": [U], "chosen": "yes", "rejected": "no"}) + "\n")
    recs = read_preferences(f)
    assert [r.reward_gap for r in recs] == [1.5, 0.25, None]
    assert recs[1].chosen == ({"role": "assistant", "content": "yes"},)


@pytest.mark.parametrize("record,message", [
    ({"messages": [U, A]}, "line 1: missing field 'id'"),
    ({"id": "x", "messages": [U]}, "line 1 (id 'x'): field 'messages': no assistant message"),
    ({"id": "x", "messages": [U, {"role": "bot", "content": "hi"}]},
     "field 'messages[1].role': expected one of"),
    ({"id": "x", "messages": [U, {"role": "assistant", "content": None}]},
     "field 'messages[1].content': expected a string, got NoneType"),
    ({"id": "x", "messages": []}, "field 'messages': expected a non-empty list"),
])
def test_bad_sft_record_names_file_record_field(tmp_path, record, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_sft(f)
    assert str(f) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"prompt": [U, A]}, "field 'prompt': the prompt must end with a user"),
    ({"chosen": [U]}, "field 'chosen': the last message must have role 'assistant'"),
    ({"rejected": None}, "field 'rejected': expected a non-empty list"),
    ({"reward_gap": "big"}, "field 'reward_gap': expected a number"),
    ({"reward_gap": float("nan")}, "field 'reward_gap': must be finite"),
])
def test_bad_preference_record(tmp_path, change, message):
    f = tmp_path / "bad.parquet"
    rows = [pair(0), {**pair(1), **change}]
    if "reward_gap" in change:  # parquet columns need one type; use JSONL for the odd value
        f = tmp_path / "bad.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in rows))
        where = "line 2 (id 'p1')"
    else:
        pq.write_table(pa.Table.from_pylist(rows), f)
        where = "record 2 (id 'p1')"
    with pytest.raises(DataError) as e:
        read_preferences(f)
    assert f"{f}: {where}: {message}" in str(e.value)


def test_duplicate_ids_and_invalid_json(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(pair(0)) + "\n" + json.dumps(pair(0)) + "\n")
    with pytest.raises(DataError, match=r"line 2 \(id 'p0'\): duplicate id 'p0' \(first seen at"):
        read_preferences(f)
    f.write_text(json.dumps(pair(0)) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_preferences(f)
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "missing")


def test_non_utf8_names_file_line_and_offset(tmp_path):
    ok = json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "r"}]})
    jsonl, array = tmp_path / "a.jsonl", tmp_path / "b.json"
    jsonl.write_bytes(f"{ok}\n\n".encode() + b'{"id": "caf\xc3"}\n')
    with pytest.raises(DataError, match=rf"a.jsonl: line 3: not valid UTF-8 \(byte 0xc3 at byte "
                                        rf"offset {len(ok) + 2 + 11} of the file\)"):
        read_sft(jsonl)
    array.write_bytes(f"[{ok},\n{ok},\n".encode() + b'{"id": "\xff"}]')
    with pytest.raises(DataError, match=r"b.json: line 3: not valid UTF-8 \(byte 0xff"):
        read_sft(array)
    lone = tmp_path / "c.jsonl"
    lone.write_text(ok.replace('"r"', '"half \\ud800"') + "\n")  # a JSON escape, valid UTF-8
    with pytest.raises(DataError, match=r"c.jsonl: line 1 \(id 'a'\): field 'messages\[1\].content': "
                                        "not valid UTF-8 text"):
        read_sft(lone)


def test_non_utf8_parquet_names_the_record(tmp_path):
    values = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(
        bytes([0, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0])), pa.py_buffer(b"okcaf\xe9")])
    pq.write_table(pa.table({"id": values, "messages": [[], []]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: record 2: a string is not valid UTF-8"):
        read_sft(tmp_path / "d.parquet")
