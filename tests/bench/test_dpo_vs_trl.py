"""The pure parts of bench/dpo_vs_trl.py (the benchmark itself installs TRL and is not run in
CI): pair lengths per data shape, the generated pairs, steady token rates, ratios and goals."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import dpo_vs_trl as b  # noqa: E402


def test_long_pairs_never_share_a_bin_and_mixed_span_100_to_1000():
    long = b.target_pair_lengths("long", 500, 1024, seed=1)
    assert all(512 < n <= 1024 for n in long)
    mixed = b.target_pair_lengths("mixed", 500, 1024, seed=1)
    assert all(100 <= n <= 1000 for n in mixed) and max(mixed) - min(mixed) > 700
    assert b.target_pair_lengths("mixed", 5, 1024, seed=3) == b.target_pair_lengths("mixed", 5, 1024, seed=3)
    with pytest.raises(ValueError, match="unknown shape"):
        b.target_pair_lengths("short", 1, 1024)


def test_split_pair_adds_up():
    rng = random.Random(0)
    for total in (40, 300, 1000):
        p, c, r = b.split_pair(total, rng)
        assert 2 * p + c + r == total and min(p, c, r) > 0


def test_steady_rate_skips_warmup_and_counts_useful_tokens():
    steps = [{"seconds": 10.0, "real": 1, "padded": 2, "pairs": 8},
             {"seconds": 2.0, "real": 300, "padded": 400, "pairs": 8},
             {"seconds": 1.0, "real": 150, "padded": 200, "pairs": 6}]
    r = b.steady_rate(steps, warmup=1)
    assert r["tokens_per_second"] == 150.0 and r["seconds_per_step"] == 1.5
    assert r["real_fraction"] == 0.75 and r["pairs_per_step"] == 7 and r["steps"] == 2
    with pytest.raises(ValueError):
        b.steady_rate(steps, warmup=3)


def test_ratios_goals_and_best_of():
    run = lambda tps, ref: {"precomputed": {"tokens_per_second": tps},  # noqa: E731
                            "online": {"tokens_per_second": tps / 2},
                            "reference_pass": {"seconds": ref}}
    avr = b.best_of([run(300.0, 10.0), run(360.0, 12.0)])
    assert avr["precomputed"]["tokens_per_second"] == 360.0
    assert avr["reference_pass"]["seconds"] == 10.0 and len(avr["runs"]) == 2
    trl = b.best_of([run(240.0, 15.0)])
    r = b.ratios(avr, trl)
    assert r == {"train_precomputed": 1.5, "train_online": 1.5, "reference_pass": 1.5}
    goals = b.goal_status("mixed", {"train_precomputed": 1.5, "train_online": 1.2})
    assert goals["train_precomputed"]["met"] and not goals["train_online"]["met"]
    assert all(g["met"] for g in b.goal_status("long", r).values())


def test_make_pairs_hits_the_lengths_both_sides_tokenise(tmp_path):
    from transformers import AutoTokenizer

    from avr_megatron.data.chat import ChatTokenizer
    from avr_megatron.data.records import read_preferences
    from avr_megatron.data.tokenized import tokenize_preferences
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import write_jsonl

    tok = AutoTokenizer.from_pretrained(train_tiny_tokenizer(tmp_path / "tok", vocab_size=400))
    pairs = b.make_pairs(tok, "long", 6, 256, seed=2)
    targets = b.target_pair_lengths("long", 6, 256, seed=2)
    got = [b._rendered_pair_tokens(tok, r) for r in pairs]
    assert all(128 < n <= 256 for n in got)
    assert all(abs(g - t) <= 8 for g, t in zip(got, targets)), (got, targets)
    # avr's own tokenisation (chat masks located by rendering prefixes) sees the same lengths
    write_jsonl(pairs, tmp_path / "pairs.jsonl")
    data = tokenize_preferences(read_preferences(tmp_path / "pairs.jsonl"), ChatTokenizer(tok),
                                256, "drop")
    assert sorted(int(n) for n in data.unit_lengths) == sorted(got)
    assert math.isclose(sum(got) / len(got), sum(targets) / len(targets), rel_tol=0.05)
