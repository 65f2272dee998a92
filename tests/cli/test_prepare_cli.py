"""`avr prepare`: recipe + overrides, resolved config saved, train and valid prepared (kind told
from the records), a rerun finds them, bad data exits 2 naming file/record/field."""

import json
from pathlib import Path

from avr_megatron.cli.main import main
from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
from avr_megatron.testing.toy_data import preference_records, sft_records, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _args(tmp_path, train, valid=None):
    args = ["prepare", "--recipe", "recipes/tiny_sft.yaml", f"data.train={train}",
            f"data.tokenizer={tmp_path / 'tok'}", f"run.dir={tmp_path / 'run'}",
            "train.seq_length=128"]
    return args + ([f"data.valid={valid}"] if valid else [])


def test_prepare_train_and_valid_then_rerun(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    train_tiny_tokenizer(tmp_path / "tok")
    train = write_jsonl(sft_records(30), tmp_path / "sft.jsonl")
    valid = write_jsonl(sft_records(8, seed=9), tmp_path / "valid.jsonl")
    assert main(_args(tmp_path, train, valid)) == 0
    out = capsys.readouterr().out
    assert "data.train (sft): 30 of 30 records used" in out
    assert "data.valid (sft): 8 of 8 records used" in out
    rows = json.loads((tmp_path / "run" / "prepare_summary.json").read_text())
    assert [r["split"] for r in rows] == ["train", "valid"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    first = [r["built"] for r in rows]
    assert main(_args(tmp_path, train, valid)) == 0  # found, not rebuilt
    rows = json.loads((tmp_path / "run" / "prepare_summary.json").read_text())
    assert [r["built"] for r in rows] == first
    pairs = write_jsonl(preference_records(12), tmp_path / "pairs.jsonl")
    assert main(_args(tmp_path, pairs)) == 0
    assert "data.train (preference): 12 of 12" in capsys.readouterr().out


def test_prepare_bad_record_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    train_tiny_tokenizer(tmp_path / "tok")
    recs = sft_records(10)
    recs[4]["messages"][1]["content"] = 7
    train = write_jsonl(recs, tmp_path / "sft.jsonl")
    assert main(_args(tmp_path, train)) == 2
    err = capsys.readouterr().err
    assert f"{train}: line 5 (id 'sft-4'): field 'messages[1].content'" in err
    assert main(_args(tmp_path, train) + ["data.prepared=in_memory"]) == 2
    assert "data.prepared=in_memory" in capsys.readouterr().err
