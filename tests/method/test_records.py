import json

import pytest

from avr_megatron.method.records import (
    COLUMN_TYPES,
    PREFERENCE_COLUMNS,
    SFT_COLUMNS,
    preference_record,
    sft_record,
    source_sft_record,
    validate_preference_record,
    validate_sft_record,
)
from avr_megatron.method.requests import SamplingParams
from avr_megatron.method.tree import Provenance

X = [{"role": "user", "content": "Q"}]
PROV = Provenance("policy", "rm", SamplingParams(temperature=0.7, top_p=0.8, seed=11))


def sft(**kw):
    args = dict(id="p/s1/rsft", kind="rsft", stage=1, prompt_id="p", messages=[*X, {"role": "assistant", "content": "A"}],
                round=1, reward=2.0, reward_base=0.5, provenance=PROV)
    args.update(kw)
    return sft_record(**args)


def pref(**kw):
    args = dict(id="p/s1/response", pair_type="response", stage=1, prompt_id="p", prompt=X, chosen="good", rejected="bad",
                round=1, reward_chosen=2.0, reward_rejected=0.5, reward_base=0.5, provenance=PROV)
    args.update(kw)
    return preference_record(**args)


def test_sft_record_shape():
    r = sft()
    assert tuple(r) == SFT_COLUMNS
    assert r["reward_gain"] == 1.5 and r["model"] == "policy" and r["reward_model"] == "rm"
    assert (r["temperature"], r["top_p"], r["seed"], r["max_tokens"]) == (0.7, 0.8, 11, 2048)
    src = source_sft_record("p/1", [*X, {"role": "assistant", "content": "ref"}])
    assert tuple(src) == SFT_COLUMNS and src["kind"] == "source" and src["id"] == "p%2F1/source"
    assert src["reward"] is None and src["model"] is None and src["reward_gain"] is None


def test_preference_record_is_trl_conversational():
    r = pref()
    assert tuple(r) == PREFERENCE_COLUMNS
    assert r["prompt"] == X
    assert r["chosen"] == [{"role": "assistant", "content": "good"}]
    assert r["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert r["reward_gap"] == 1.5


def test_every_column_has_a_type():
    assert set(SFT_COLUMNS) | set(PREFERENCE_COLUMNS) <= set(COLUMN_TYPES)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"kind": "dpo"}, r"^sft record 'p/s1/rsft'\.kind: expected one of"),
        ({"messages": X}, r"^sft record 'p/s1/rsft'\.messages\[0\]\.role: the conversation must end with a 'assistant'"),
        ({"reward": float("nan")}, r"^sft record 'p/s1/rsft'\.reward: expected a finite number"),
        ({"round": 1.5}, r"^sft record 'p/s1/rsft'\.round: expected an integer"),
        ({"prompt_id": None}, r"^sft record 'p/s1/rsft'\.prompt_id: must not be None"),
    ],
)
def test_bad_sft_records(change, match):
    with pytest.raises(ValueError, match=match):
        sft(**change)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"pair_type": "refine"}, r"\.pair_type: expected one of"),
        ({"prompt": [*X, {"role": "assistant", "content": "a"}]}, r"\.prompt\[1\]\.role: the conversation must end with a 'user'"),
        ({"chosen": " "}, r"\.chosen\[0\]\.content: is empty"),
        ({"reward_chosen": None}, r"^preference record 'p/s1/response'\.reward_chosen: expected a number, got NoneType"),
    ],
)
def test_bad_preference_records(change, match):
    with pytest.raises(ValueError, match=match):
        pref(**change)


def test_validators_catch_edited_records():
    r = pref()
    r["reward_gap"] = 9.0
    with pytest.raises(ValueError, match=r"^preference record\.reward_gap: must equal"):
        validate_preference_record(r)
    r = pref()
    r["rejected"] = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match=r"^preference record\.rejected\[0\]\.role: expected 'assistant'"):
        validate_preference_record(r)
    s = sft()
    del s["seed"]
    with pytest.raises(ValueError, match=r"^sft record\.seed: missing"):
        validate_sft_record(s)
    s = sft()
    s["extra"] = 1
    with pytest.raises(ValueError, match=r"^sft record\.extra: unknown field"):
        validate_sft_record(s)


def test_records_are_json_and_arrow_stable():
    """Records of one kind share a schema, so shards with all-None columns still concatenate
    (Parquet shards are Arrow tables on disk; `datasets` reads them through Arrow)."""
    pa = pytest.importorskip("pyarrow")
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "messages": message}

    def schema(columns):
        return pa.schema([(c, types[COLUMN_TYPES[c]]) for c in columns])

    shard_a = [sft(), sft(id="q/s1/rsft", prompt_id="q")]
    shard_b = [source_sft_record("r", [*X, {"role": "assistant", "content": "ref"}])]  # provenance all None
    tables = []
    for shard in (shard_a, shard_b):
        assert json.loads(json.dumps(shard)) == shard
        tables.append(pa.Table.from_pylist(shard, schema=schema(SFT_COLUMNS)))
    rows = pa.concat_tables(tables).to_pylist()
    assert rows == shard_a + shard_b
    assert [validate_sft_record(r) for r in rows] == rows

    prefs = [pref(), pref(id="p/s1/criticism", pair_type="criticism", reward_base=None)]
    table = pa.Table.from_pylist(prefs, schema=schema(PREFERENCE_COLUMNS))
    assert table.to_pylist() == prefs and table.schema.field("chosen").type == message
