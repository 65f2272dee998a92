"""`avr train` / `avr logps` stop before any model is built, with exit code 2 and a message
naming the key, file, record or field, on bad recipes and data (in-process: no processes are
started and nothing heavy is imported)."""

import json
from pathlib import Path

import pytest

from avr_megatron.cli.main import main
from avr_megatron.testing.tiny_hf import train_tiny_tokenizer


def _conversion_available() -> bool:
    try:  # import, not find_spec: the package must also fit this checkout's modules
        import avr_megatron.conversion  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_record_names_file_record_and_field(tmp_path, tok, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": [{"role": "user", "content": "q"}],
                               "chosen": [{"role": "assistant", "content": 3}],
                               "rejected": "no"}) + "\n")
    code, err = _run(capsys, "train", "dpo", f"run.dir={tmp_path / 'run'}",
                     f"data.train={bad}", f"data.tokenizer={tok}")
    assert code == 2
    assert f"{bad}: line 1 (id 'a'): field 'chosen[0].content': expected a string" in err


def test_missing_inputs_and_unavailable_hf_init(tmp_path, tok, capsys):
    code, err = _run(capsys, "train", "sft", f"run.dir={tmp_path / 'run'}")
    assert code == 2 and "data.train is not set" in err
    hf = tmp_path / "hf"
    hf.mkdir()
    code, err = _run(capsys, "train", "sft", f"run.dir={tmp_path / 'run'}",
                     f"model.init_from.hf={hf}", f"data.train={tmp_path / 'x.jsonl'}")
    assert code == 2
    if not _conversion_available():
        assert "model.init_from.hf needs the Hugging Face <-> Megatron converter" in err
    else:  # the converter reads the (empty) HF directory
        assert "model.init_from.hf" in err and "config.json" in err
    code, err = _run(capsys, "train", "sft", f"run.dir={tmp_path / 'run'}",
                     f"model.init_from.mcore={tmp_path / 'nope'}")
    assert code == 2 and "model.init_from.mcore: no checkpoint at" in err
    code, err = _run(capsys, "logps", f"run.dir={tmp_path / 'run'}",
                     f"data.train={tmp_path / 'missing.jsonl'}", f"data.tokenizer={tok}")
    assert code == 2 and "missing.jsonl: no such file or directory" in err
    code, err = _run(capsys, "train", "dpo", f"run.dir={tmp_path / 'run'}",
                     "parallel.context_parallel_size=2")
    assert code == 2 and "context_parallel_size" in err


def test_reward_gap_loss_needs_gaps(tmp_path, tok, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": [{"role": "user", "content": "q"}],
                                "chosen": "yes", "rejected": "no"}) + "\n")
    code, err = _run(capsys, "train", "dpo", f"run.dir={tmp_path / 'run'}", f"data.train={data}",
                     f"data.tokenizer={tok}", "loss.reward_gap=margin")
    assert code == 2
    assert "line 1 (id 'a'): loss.reward_gap=margin needs a reward gap" in err


def test_too_little_data_for_one_step_is_a_data_error(tmp_path, tok, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}) + "\n")
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
    code, err = _run(capsys, "train", "sft", "--recipe", recipe,
                     f"run.dir={tmp_path / 'run'}", f"data.train={data}", f"data.tokenizer={tok}",
                     "train.global_batch_size=4", "train.micro_batch_size=2")
    assert code == 2
    assert f"data.train={data}: the data fill 1 bins, fewer than one global batch" in err


@pytest.mark.parametrize("command", [("train", "sft"), ("train", "dpo"), ("logps",)])
def test_non_utf8_training_data_names_file_line_and_offset(tmp_path, tok, capsys, command):
    """A Latin-1 byte in a JSONL file: exit 2 naming file, line and byte offset (it was a
    UnicodeDecodeError traceback naming nothing)."""
    good = {"id": "a", "messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "r"}],
            "prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "y"}
    data = tmp_path / "data.jsonl"
    first = (json.dumps(good) + "\n").encode()
    data.write_bytes(first + b'{"id": "b", "prompt": "caf\xe9"}\n')
    code, err = _run(capsys, *command, f"run.dir={tmp_path / 'run'}", f"data.train={data}",
                     f"data.tokenizer={tok}")
    assert code == 2, err
    assert f"{data}: line 2: not valid UTF-8 (byte 0xe9 at byte offset {len(first) + 26} " in err
    assert "Traceback" not in err
