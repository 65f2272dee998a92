"""The dataset card of a synthesis output directory: written once every shard has finished, says
what made the rows (models, seed, configuration fingerprint), counts them and lists the skipped
input records with their reasons; `datasets.load_dataset(<directory>)` still reads the rows and the
card changes no content fingerprint; `avr pairs` with synth.pairs.valid_fraction holds out whole
prompts. Engines are deterministic fakes (milliseconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from avr_megatron.config import load_config
from avr_megatron.data.fingerprint import fingerprint_dir
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.synth.driver import pass_dir, run_pass
from avr_megatron.synth.pairs import pairs_stage1

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
MIXED = Path(__file__).parent / "fixtures" / "mixed_prompts.jsonl"  # 4 good records, 12 bad ones


def _unit(*parts) -> float:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


class _Chat:
    name = "fake-policy"

    def generate(self, requests):
        crit = PromptTemplates().criticise
        return [[(f"Review {r.key}#{j}. Rating: [[{1 + int(9 * _unit(r.key, j))}]]"
                  if r.messages[-1]["content"] == crit else f"Answer {r.key}#{j}.") for j in range(r.n)]
                for r in requests]

    def close(self):
        pass


class _Reward:
    name = "fake-reward"

    def score(self, requests):
        return [round(4 * _unit(r.messages[-1]["content"]) - 2, 6) for r in requests]

    def close(self):
        pass


def _tiny_prompts_config(run_dir, *overrides):
    """The tiny recipe on the shipped prompts with the fake engines (no model paths)."""
    return load_config(RECIPE, [f"run.dir={run_dir}", "synth.progress=false", "synth.policy.model=null",
                                "synth.reward.model=null",
                                f"synth.input.path={REPO / 'data' / 'prompts' / 'tiny_prompts.jsonl'}",
                                *overrides])


def test_card_after_the_last_shard_names_models_counts_and_skipped_records(tmp_path):
    overrides = [f"run.dir={tmp_path}", f"synth.input.path={MIXED}", "synth.progress=false", "synth.chunk_size=1",
                 "synth.policy.model=null", "synth.reward.model=null", "synth.scheduling=barrier",
                 "synth.rating_fallback=false", "synth.policy.name=fake-policy", "synth.reward.name=fake-reward"]
    cfg = load_config(RECIPE, overrides)
    out = pass_dir(cfg, "stage1")
    card = out / "README.md"
    run_pass("stage1", cfg, (1, 2), engines=(_Chat(), _Reward()))
    assert not card.exists()  # shard 0 has not run: no card for half a dataset
    run_pass("stage1", cfg, (0, 2), engines=(_Chat(), _Reward()))
    text = card.read_text()
    manifest = json.loads(sorted(out.glob("manifest-*.json"))[0].read_text())

    assert text.startswith("---\npretty_name: \"AvR stage-1 refinement trees\"\n") and "- synthetic" in text
    assert "- records: 4\n" in text and '| rows by status | {"ok": 4} |' in text
    assert f"| configuration fingerprint (sha256) | {manifest['fingerprint_sha256']} |" in text
    assert "| policy model | fake-policy |" in text and "| reward model | fake-reward |" in text
    assert f"| run.seed | {cfg.run.seed} |" in text and "| input | mixed_prompts.jsonl |" in text
    assert "12 input record(s) were skipped" in text and "- prompt: 6\n" in text
    skipped = json.loads((out / "summary.json").read_text())["invalid"]["records"]
    assert len(skipped) == 12
    for r in skipped:  # every skipped record is listed with its reason
        assert f"| {r['row']} | {r['id'] or ''} |" in text and r["reason"].split("\n")[0][:40] in text
    assert str(tmp_path) not in text  # no machine-specific paths: the same data, the same card

    from datasets import load_dataset

    ds = load_dataset(str(out), split="train")
    assert sorted(ds["prompt_id"]) == ["ok-0", "ok-1", "ok-2", "ok-3"]
    before = fingerprint_dir(out)
    card.unlink()
    assert fingerprint_dir(out) == before  # the card is not content

    # `avr pairs` cards name the synthesis output they were built from, the models that made it
    # (not the recipe's, which may name other ones by then) and the rule rejections.
    written = pairs_stage1(load_config(RECIPE, [*overrides, "synth.policy.name=later-model"]))["outputs"]
    pairs_card = (Path(written["preference"]["path"]).parent / "README.md").read_text()
    assert (f"| synthesis output | `avr synth stage1`, configuration fingerprint (sha256) "
            f"{manifest['fingerprint_sha256']} |") in pairs_card
    assert "| candidates accepted / rejected by rule (whole run) | {" in pairs_card
    assert "| policy model | fake-policy |" in pairs_card


def test_card_says_when_nothing_was_skipped(tmp_path):
    cfg = _tiny_prompts_config(tmp_path, "synth.input.limit=3", "synth.output_format=jsonl")
    run_pass("stage2", cfg, engines=(_Chat(), _Reward()))
    text = (pass_dir(cfg, "stage2") / "README.md").read_text()
    assert "AvR stage-2 refinement searches" in text and "- records: 3\n" in text
    assert "None: every input record was synthesised." in text
    assert "train-00000-of-00001-c000000.jsonl" in text


def test_held_out_split_keeps_every_prompt_on_one_side(tmp_path):
    from datasets import load_dataset

    from avr_megatron.synth.pairs import held_out_prompts, split_held_out, valid_dir

    cfg = _tiny_prompts_config(tmp_path, "synth.input.limit=12", "synth.pairs.valid_fraction=0.25")
    run_pass("stage1", cfg, engines=(_Chat(), _Reward()))
    written = pairs_stage1(cfg)["outputs"]
    assert set(written) == {"sft", "sft_valid", "preference", "preference_valid"}
    for name in ("sft", "preference"):
        train_dir = Path(written[name]["path"]).parent
        assert Path(written[f"{name}_valid"]["path"]) == valid_dir(train_dir) / "validation.parquet"
        train = load_dataset(str(train_dir), split="train")
        valid = load_dataset(str(valid_dir(train_dir)), split="validation")
        assert valid.num_rows == written[f"{name}_valid"]["rows"] > 0 and train.num_rows == written[name]["rows"] > 0
        assert not set(train["prompt_id"]) & set(valid["prompt_id"])
        assert "(validation split)" in (valid_dir(train_dir) / "README.md").read_text()
    # The same prompts (3 of 12) are held out of both datasets.
    sft_valid = set(load_dataset(str(valid_dir(Path(written["sft"]["path"]).parent)),
                                 split="validation")["prompt_id"])
    pref_valid = set(load_dataset(str(valid_dir(Path(written["preference"]["path"]).parent)),
                                  split="validation")["prompt_id"])
    pref_all = pref_valid | set(load_dataset(str(Path(written["preference"]["path"]).parent), split="train")["prompt_id"])
    assert pref_valid == sft_valid & pref_all and len(sft_valid) == 3  # every prompt has SFT data (mix-in)

    ids = [f"p{i}" for i in range(40)]
    assert held_out_prompts(ids, 0.0, 1) == set() and held_out_prompts(ids[:1], 0.9, 1) == set()
    held = held_out_prompts(ids, 0.25, 1)
    assert len(held) == 10 and held == held_out_prompts(ids * 2, 0.25, 1) != held_out_prompts(ids, 0.25, 2)
    assert len(held_out_prompts(ids[:2], 0.001, 1)) == 1 and len(held_out_prompts(ids[:2], 0.99, 1)) == 1
    rows = [{"prompt_id": p, "n": j} for p in ids for j in range(3)]
    train, valid = split_held_out(rows, held)
    assert len(valid) == 30 and {r["prompt_id"] for r in valid} == held and len(train) + len(valid) == len(rows)
