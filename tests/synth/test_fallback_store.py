import json

import pytest

from avr_megatron.config import ConfigError
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.ratings import extract_rating
from avr_megatron.method.requests import GenerateRequest, SamplingParams
from avr_megatron.synth.fallback import MARK, CriticismCounter
from avr_megatron.synth.store import ShardStore, read_output


def _requests(t):
    x = [{"role": "user", "content": "Q"}]
    crit = GenerateRequest("p%2F1/s1/r1/b0/crit/t1", t.criticise_turns(x, "answer"), 3, SamplingParams())
    other = GenerateRequest("p2/s1/r1/b0/c0/improve", t.improve_turns(x, "answer", "c [[3]]"), 2, SamplingParams())
    return crit, other


@pytest.mark.parametrize("enabled", [True, False])
def test_rating_fallback_only_touches_criticisms_and_counts(enabled):
    t = PromptTemplates()
    crit, other = _requests(t)
    outputs = [["no rating here", "rated [[7]]", ""], ["improved", "improved too"]]
    got = CriticismCounter(t, enabled)([crit, other], [list(o) for o in outputs])
    counter = CriticismCounter(t, enabled)
    again = counter([crit, other], [list(o) for o in outputs])
    assert got == again  # deterministic ratings
    assert counter.samples == {"p/1": 3}
    assert got[1] == outputs[1] and got[0][1] == "rated [[7]]"
    if enabled:
        assert counter.fired == {"p/1": 2}
        for text in (got[0][0], got[0][2]):
            assert MARK in text and extract_rating(text) is not None
        assert got[0][0].startswith("no rating here")
    else:
        assert not counter.fired and got == outputs


@pytest.mark.parametrize("parse", ["first", "last"])
def test_rating_fallback_gives_a_rating_that_parses_under_the_recipes_reading(parse):
    t = PromptTemplates()
    crit, _ = _requests(t)
    texts = ["no rating", "[[0]] is no rating, [[4]] is", "[[11]] then nothing"]
    counter = CriticismCounter(t, True, rating_parse=parse)
    (got,) = counter([crit], [list(texts)])
    for before, after in zip(texts, got):
        if extract_rating(before, parse) is None:
            assert MARK in after and before in after and extract_rating(after, parse) is not None
        else:
            assert after == before
    # "first": an earlier non-rating [[n]] would still decide, so the marked rating goes first.
    assert got[1].startswith(MARK) if parse == "first" else got[1] == texts[1]
    assert got[0].startswith("no rating")


def test_store_refuses_another_configuration_and_clears_stale_temp_files(tmp_path):
    import pyarrow as pa

    schema = pa.schema([("prompt_id", pa.string()), ("row", pa.int64())])
    store = ShardStore(tmp_path, kind="stage1", shard=(0, 2), fmt="parquet", fingerprint={"seed": 1})
    store.open()
    store.write_manifest(complete=False)
    store.write_chunk(3, [{"prompt_id": "a", "row": 6}], schema)
    stale = store.data / ".train-00000-of-00002-c000004.parquet.999.tmp"
    stale.write_bytes(b"half a file")
    again = ShardStore(tmp_path, kind="stage1", shard=(0, 2), fmt="parquet", fingerprint={"seed": 1})
    again.open()
    assert not stale.exists() and again.done_chunks() == {3}
    with pytest.raises(ConfigError, match=r"different configuration \(differs in: seed\)"):
        ShardStore(tmp_path, kind="stage1", shard=(1, 2), fmt="parquet", fingerprint={"seed": 2}).open()
    with pytest.raises(ConfigError, match=r"differs in: num_shards"):
        ShardStore(tmp_path, kind="stage1", shard=(0, 3), fmt="parquet", fingerprint={"seed": 1}).open()
    with pytest.raises(ConfigError, match="missing: \\[1\\], unfinished: \\[0\\]"):
        read_output(tmp_path)
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["fingerprint"]["num_shards"] == 2 and len(manifest["fingerprint_sha256"]) == 64
    assert read_output(tmp_path, require_complete=False) == [{"prompt_id": "a", "row": 6}]


def test_store_clears_manifest_and_other_shards_temp_files_of_dead_writers(tmp_path):
    """`.manifest-*.tmp`, summary and partial chunk files of a killed run go at the next start;
    another shard's files of a live writer stay."""
    import os
    import subprocess
    import sys

    from avr_megatron.runtime.files import owner_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().rsplit("-", 1)[0]
    (tmp_path / "data").mkdir(parents=True)
    gone = [tmp_path / f".manifest-00000-of-00002.json.{host}-{os.getppid()}.tmp",  # own shard
            tmp_path / f".summary.json.{host}-{dead.pid}.tmp",
            tmp_path / f".manifest-00001-of-00002.json.{host}-{dead.pid}.tmp",
            tmp_path / "data" / f".train-00001-of-00002-c000001.parquet.{host}-{dead.pid}.tmp"]
    kept = [tmp_path / "data" / f".train-00001-of-00002-c000002.parquet.{host}-{os.getppid()}.tmp"]
    for p in gone + kept:
        p.write_bytes(b"partial")
    ShardStore(tmp_path, kind="stage1", shard=(0, 2), fmt="parquet", fingerprint={"seed": 1}).open()
    assert [p for p in gone if p.exists()] == [] and all(p.exists() for p in kept)
