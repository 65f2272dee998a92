import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avr_megatron.config import ConfigError, load_config
from avr_megatron.synth.inputs import load_prompts, parse_shard

FIXTURE = Path(__file__).parent / "fixtures" / "mixed_prompts.jsonl"
TINY = Path(__file__).parents[2] / "data" / "prompts" / "tiny_prompts.jsonl"


def _input(path, **fields):
    overrides = [f"synth.input.path={path}"] + [f"synth.input.fields.{k}={v}" for k, v in fields.items()]
    return load_config(None, overrides).synth.input


def test_invalid_records_are_counted_by_id_with_the_field():
    loaded = load_prompts(_input(FIXTURE, id="id", prompt="prompt", answer="answer"))
    assert [r.prompt_id for r in loaded.records] == ["ok-0", "ok-1", "ok-2", "ok-3"]
    assert loaded.records[1].x[0] == {"role": "system", "content": "Be brief."}
    assert loaded.records[3].y0 == "Apple."
    bad = {(r.row, r.prompt_id): (r.field, r.reason) for r in loaded.invalid}
    assert loaded.rows == 16 and len(loaded.records) + len(loaded.invalid) == 16
    expect = {
        (1, "missing-prompt"): ("prompt", "missing"), (2, "empty-prompt"): ("prompt", "empty"),
        (3, "int-prompt"): ("prompt", "expected a string or a list of messages, got int"), (5, "wrong-role"): ("prompt", "expected 'user'"),
        (6, "ends-with-assistant"): ("prompt", "must end with a 'user' turn"),
        (7, "bad-role-name"): ("prompt", "expected one of"), (8, None): (None, "line 9: not valid JSON"),
        (9, "ok-0"): ("id", "duplicate id 'ok-0' (first at row 0)"), (10, "null-answer"): ("answer", "null"),
        (11, "empty-answer"): ("answer", "empty"), (12, None): (None, "expected a JSON object"),
        (14, None): ("id", "missing"),
    }
    assert set(bad) == set(expect)
    for key, (field, words) in expect.items():
        assert bad[key][0] == field and words in bad[key][1], (key, bad[key])


def test_formats_parquet_directory_and_disk_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [json.loads(line) for line in TINY.read_text().splitlines()]
    reference = load_prompts(_input(TINY, id="id", answer="answer"))
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "a.parquet")
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "dir" / "0.parquet")
    with open(tmp_path / "dir" / "1.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[20:])
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    for path, n in ((tmp_path / "a.parquet", 20), (tmp_path / "dir", 50), (tmp_path / "disk", 50)):
        loaded = load_prompts(_input(path, id="id", answer="answer"))
        assert loaded.records == reference.records[:n] and not loaded.invalid, path
    limited = load_prompts(load_config(None, [f"synth.input.path={TINY}", "synth.input.limit=7"]).synth.input)
    assert [r.prompt_id for r in limited.records] == [f"row-{i}" for i in range(7)]


def test_unreachable_hub_name_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_prompts(_input(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="hub dataset failed"):
        load_prompts(_input("some-org/some-dataset-that-is-not-here"))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=7))
def test_shards_partition_rows_disjointly_and_completely(n):
    cfg = _input(FIXTURE, id="id", answer="answer")
    full = load_prompts(cfg)
    parts = [load_prompts(cfg, (i, n)) for i in range(n)]
    ids = [r.prompt_id for p in parts for r in p.records]
    assert sorted(ids) == sorted(r.prompt_id for r in full.records) and len(ids) == len(set(ids))
    bad = [r.row for p in parts for r in p.invalid]
    assert sorted(bad) == sorted(r.row for r in full.invalid)
    for i, p in enumerate(parts):
        assert all(r.row % n == i for r in p.records) and all(r.row % n == i for r in p.invalid)


def test_parse_shard():
    assert parse_shard(None) == (0, 1) and parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_chosen_column_of_a_preference_set(tmp_path):
    """UltraFeedback style: `chosen` is the prompt's conversation ending with the chosen answer."""
    user = {"role": "user", "content": "Q?"}
    rows = [
        {"id": "a", "prompt": "Q?", "chosen": [user, {"role": "assistant", "content": "A."}]},
        {"id": "b", "prompt": "Q?", "chosen": "A string answer."},
        {"id": "c", "prompt": "Q?", "chosen": [{"role": "user", "content": "Other?"},
                                              {"role": "assistant", "content": "A."}]},
        {"id": "d", "prompt": "Q?", "chosen": [user]},
        {"id": "e", "prompt": "Q?", "chosen": None},
        {"id": "f", "prompt": "Q?", "sys": "Be brief.", "chosen": [user, {"role": "assistant", "content": "A."}]},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(_input(path, id="id", chosen="chosen"))
    assert [r.prompt_id for r in loaded.records] == ["a", "b", "f"]
    assert loaded.records[0].chosen == [user, {"role": "assistant", "content": "A."}]
    assert loaded.records[1].chosen == [user, {"role": "assistant", "content": "A string answer."}]
    assert loaded.records[0].y0 is None  # stage 1 still samples y0 (fields.answer is unset)
    bad = {r.prompt_id: (r.field, r.reason) for r in loaded.invalid}
    assert bad["c"] == ("chosen", "field 'chosen': the turns before the chosen answer differ from the prompt")
    assert bad["d"][0] == "chosen" and "must end with a 'assistant' turn" in bad["d"][1]
    assert bad["e"] == ("chosen", "field 'chosen' is null")
    # A system prompt added from synth.input.fields.system may be missing from the chosen turns.
    with_system = load_prompts(_input(path, id="id", chosen="chosen", system="sys"))
    f = next(r for r in with_system.records if r.prompt_id == "f")
    assert f.x[0]["role"] == "system" and f.chosen[-1]["content"] == "A."


def test_mixing_source_chosen_needs_a_chosen_column():
    with pytest.raises(ConfigError, match="synth.pairs.mix_source_chosen=true needs synth.input.fields.chosen"):
        load_config(None, ["synth.pairs.mix_source_chosen=true"])
    with pytest.raises(ConfigError, match=r"synth.pairs.gating='both' is not one of \['reference', 'independent'\]"):
        load_config(None, ["synth.pairs.gating=both"])
    with pytest.raises(ConfigError, match=r"synth.stage2.start='fresh'"):
        load_config(None, ["synth.stage2.start=fresh"])
    with pytest.raises(ConfigError, match=r"synth.rating_parse='middle'"):
        load_config(None, ["synth.rating_parse=middle"])
