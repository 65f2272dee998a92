"""Synthesis end to end with a real tiny transformers policy and reward model: datasets that load
with `datasets`, reproducibility, sharding, kill + resume, invalid input, pairs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.thoughts import RefinementThought, extract_final_answer, render_thought
from avr_megatron.synth.driver import run_pass, pass_dir
from avr_megatron.synth.pairs import pairs_stage1, pairs_stage2
from avr_megatron.synth.store import load_output, read_output

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
TINY = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
FIXTURE = Path(__file__).parent / "fixtures" / "mixed_prompts.jsonl"


def _cfg(run_dir, models, *extra):
    policy, reward = models
    return load_config(RECIPE, [f"run.dir={run_dir}", f"synth.policy.model={policy}", f"synth.reward.model={reward}",
                                f"synth.input.path={TINY}", "synth.progress=false", *extra])


def _rows(cfg, kind):
    return read_output(pass_dir(cfg, kind))


def _strip(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def test_stage1_datasets_and_reproducibility(tmp_path, tiny_models, capsys):
    # The tiny recipe names a chosen column (the shipped answers) and mixes it into RSFT.
    cfg = _cfg(tmp_path / "a", tiny_models, "synth.input.limit=12", "synth.chunk_size=5")
    assert cfg.synth.input.fields.chosen == "answer" and cfg.synth.pairs.mix_source_chosen
    report = run_pass("stage1", cfg)
    out = capsys.readouterr().out
    assert "stage1 summary" in out and "rating_fallback fired" in out and "pairs by type" in out
    ds = load_output(pass_dir(cfg, "stage1"))
    assert ds.num_rows == 12 and set(ds["status"]) == {"ok"}
    summary = json.loads((pass_dir(cfg, "stage1") / "summary.json").read_text())
    assert summary["complete"] and summary["report"]["prompts"] == 12 and summary["report"]["trees"] == 12
    fb = summary["rating_fallback"]
    assert fb["enabled"] and fb["fired"] == report["rating_fallback"]["fired"] > 0
    assert fb["criticism_samples"] == 12 * cfg.synth.stage1.k

    # Same seed, fresh directory: identical rows. Another seed: other samples.
    again = _cfg(tmp_path / "b", tiny_models, "synth.input.limit=12", "synth.chunk_size=5")
    run_pass("stage1", again)
    assert _rows(again, "stage1") == _rows(cfg, "stage1")
    other = _cfg(tmp_path / "c", tiny_models, "synth.input.limit=12", "synth.chunk_size=5", "run.seed=99")
    run_pass("stage1", other)
    assert [r["tree"] for r in _rows(other, "stage1")] != [r["tree"] for r in _rows(cfg, "stage1")]

    # Pairs: RSFT (+ source mix-in) and the three pair types, loadable with datasets.
    from datasets import load_dataset

    written = pairs_stage1(cfg)["outputs"]
    sft = load_dataset("parquet", data_files=written["sft"]["path"], split="train")
    pref = load_dataset(str(Path(written["preference"]["path"]).parent), split="train")
    assert sft.num_rows == written["sft"]["rows"] and pref.num_rows == written["preference"]["rows"] > 0
    # y0 is the shipped answer, so a prompt with an RSFT example has its chosen conversation as
    # the (x, y0) of that example: it is not mixed in again.
    n_rsft = sum(k == "rsft" for k in sft["kind"])
    assert sum(k == "source" for k in sft["kind"]) == 12 - n_rsft
    assert len({json.dumps(m) for m in sft["messages"]}) == sft.num_rows  # de-duplicated
    assert set(pref["pair_type"]) <= {"response", "criticism", "improvement"} and len(set(pref["pair_type"])) >= 2
    row = pref[0]
    assert row["chosen"][0]["role"] == "assistant" and row["reward_gap"] > 0 and row["model"] == cfg.synth.policy.model
    assert json.loads((Path(written["preference"]["path"]).parent.parent / "summary.json").read_text())


def test_shards_are_disjoint_complete_and_match_one_run(tmp_path, tiny_models):
    extra = ("synth.input.limit=10", "synth.chunk_size=3")
    whole = _cfg(tmp_path / "whole", tiny_models, *extra)
    run_pass("stage1", whole)
    sharded = _cfg(tmp_path / "sharded", tiny_models, *extra)
    run_pass("stage1", sharded, (1, 3))
    with pytest.raises(ConfigError, match=r"not complete \(of 3 shards, missing: \[0, 2\]"):
        read_output(pass_dir(sharded, "stage1"))
    run_pass("stage1", sharded, (0, 3))
    run_pass("stage1", sharded, (2, 3))
    rows = _rows(sharded, "stage1")
    parts = sorted((pass_dir(sharded, "stage1") / "data").iterdir())
    per_shard = [{r["prompt_id"] for p in parts if f"-{i:05d}-of-00003" in p.name
                  for r in load_output_rows(p)} for i in range(3)]
    assert all(not (a & b) for i, a in enumerate(per_shard) for b in per_shard[i + 1:])
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in _rows(whole, "stage1")]
    # Per-request seeds: a prompt's texts do not depend on which shard or chunk it ran in.
    for a, b in zip(rows, _rows(whole, "stage1")):
        ta, tb = json.loads(a["tree"]), json.loads(b["tree"])
        assert [c["answer"] for c in ta["root"]["children"]] == [c["answer"] for c in tb["root"]["children"]]
        assert a["reward_y0"] == pytest.approx(b["reward_y0"], abs=1e-5)
    # A different shard count into the same directory is refused.
    with pytest.raises(ConfigError, match="different configuration"):
        run_pass("stage1", sharded, (0, 2))


def load_output_rows(path):
    from avr_megatron.synth.store import read_rows

    return read_rows(path)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, tiny_models):
    extra = ["synth.input.limit=24", "synth.chunk_size=1", "synth.sampling.max_tokens=32"]
    reference = _cfg(tmp_path / "ref", tiny_models, *extra)
    run_pass("stage1", reference)
    run_dir = tmp_path / "killed"
    policy, reward = tiny_models
    cmd = [sys.executable, "-m", "avr_megatron.cli.main", "synth", "stage1", "--recipe", str(RECIPE),
           f"run.dir={run_dir}", f"synth.policy.model={policy}", f"synth.reward.model={reward}",
           f"synth.input.path={TINY}", "synth.progress=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    data = run_dir / "synth" / "stage1" / "data"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if data.is_dir() and len(list(data.glob("train-*"))) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = list(data.glob("train-*.parquet"))
    assert 2 <= len(done) < 24, f"kill did not land mid-run ({len(done)} chunks done)"
    for part in done:  # every file on disk is complete
        assert len(load_output_rows(part)) == 1
    manifest = json.loads(next((run_dir / "synth" / "stage1").glob("manifest-*.json")).read_text())
    assert not manifest["complete"]
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cfg = _cfg(run_dir, tiny_models, *extra)
    rows = _rows(cfg, "stage1")
    assert [r["prompt_id"] for r in rows] == [f"tiny-{i:03d}" for i in range(24)]
    assert rows == _rows(reference, "stage1")
    assert not list(data.glob(".*.tmp"))


def test_invalid_records_reported_not_fatal(tmp_path, tiny_models, capsys):
    cfg = _cfg(tmp_path, tiny_models, f"synth.input.path={FIXTURE}")
    report = run_pass("stage1", cfg)
    assert report["invalid"]["count"] == 12 and report["report"]["prompts"] == 4
    assert {"missing-prompt", "wrong-role", "empty-answer"} <= {r["id"] for r in report["invalid"]["records"]}
    assert "invalid input records: 12" in capsys.readouterr().out
    merged = json.loads((pass_dir(cfg, "stage1") / "summary.json").read_text())
    assert merged["invalid"]["count"] == 12
    assert [r["prompt_id"] for r in _rows(cfg, "stage1")] == ["ok-0", "ok-1", "ok-2", "ok-3"]


class _ThoughtWriter:
    """A scripted thought-SFT model: well-formed thoughts whose final answers differ in length."""

    name = "scripted-thought-model"

    def __init__(self):
        self.templates = PromptTemplates()

    def generate(self, requests):
        out = []
        for r in requests:
            texts = []
            for j in range(r.n):
                final = "Answer " + "more " * (j * 3) + f"({r.key})"
                thought = RefinementThought("A first draft.", (("It is too vague. [[4]]", final),), "Nothing left. [[9]]")
                texts.append(render_thought(thought, self.templates) if j != 1 else "truncated thought without end")
            out.append(texts)
        return out

    def close(self):
        pass


class _ShortIsBetter:
    """Reward = 10 - length of the answer / 100 (shorter final answers win)."""

    name = "scripted-reward"

    def score(self, requests):
        return [10.0 - len(r.messages[-1]["content"]) / 100 for r in requests]

    def close(self):
        pass


def test_stage2_search_thoughts_and_pairs(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models, "synth.input.limit=8", "synth.chunk_size=4", "synth.stage2.max_rounds=3")
    report = run_pass("stage2", cfg)
    rows = _rows(cfg, "stage2")
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert all(1 <= r["num_rounds"] <= 3 and r["best_reward"] >= r["reward_y0"] for r in rows)
    stops = {k: v for k, v in report["summary"]["events"].items() if k.startswith("search_stop:")}
    assert sum(stops.values()) == 8 and report["report"]["mean_gain_by_round"]["1"] is not None
    ds = load_output(pass_dir(cfg, "stage2"))
    assert ds.num_rows == 8 and "search" in ds.column_names

    # Without thought samples, pairs stage2 writes the thought SFT data only.
    written = pairs_stage2(cfg)["outputs"]
    assert set(written) == {"sft"}
    sft = load_output_rows(Path(written["sft"]["path"]))
    for record in sft:
        assert record["kind"] == "thought" and extract_final_answer(record["messages"][-1]["content"]) is not None

    thoughts = run_pass("thoughts", cfg, engines=(_ThoughtWriter(), _ShortIsBetter()))
    events = thoughts["summary"]["events"]
    assert events["thoughts_sampled"] == 8 * cfg.synth.thoughts.num_samples
    assert events["thoughts_without_answer"] == 8
    written = pairs_stage2(cfg)["outputs"]
    pairs = load_output_rows(Path(written["preference"]["path"]))
    assert len(pairs) == 8 and {p["pair_type"] for p in pairs} == {"thought"}
    # The search started from the shipped ("chosen") answers, and thought pairs beat their reward.
    shipped = {json.loads(line)["id"]: json.loads(line)["answer"] for line in TINY.read_text().splitlines()}
    assert all(r["y0"] == shipped[r["prompt_id"]] for r in rows)
    source_reward = {r["prompt_id"]: r["reward_y0"] for r in rows}
    for p in pairs:
        chosen = extract_final_answer(p["chosen"][0]["content"])
        rejected = extract_final_answer(p["rejected"][0]["content"])
        assert len(chosen) < len(rejected) and p["reward_chosen"] > p["reward_rejected"]
        assert p["model"] == "scripted-thought-model"
        assert p["reward_base"] == source_reward[p["prompt_id"]] < p["reward_chosen"]
    # Length control: with longer answers scoring higher, every pair is dropped.
    cfg_long = _cfg(tmp_path, tiny_models, "synth.input.limit=8", "synth.chunk_size=4", "synth.stage2.max_rounds=3")

    class _LongIsBetter(_ShortIsBetter):
        def score(self, requests):
            return [10.0 + len(r.messages[-1]["content"]) / 100 for r in requests]

    run_pass("thoughts", cfg_long, engines=(_ThoughtWriter(), _LongIsBetter()),
              out_dir=tmp_path / "long_thoughts")
    from avr_megatron.synth.passes import build_stage2

    summary, _, pairs = build_stage2([], read_output(tmp_path / "long_thoughts"), cfg_long)
    assert not pairs and summary.rejected == {"thought:length": 8}


def test_jsonl_output_loads_with_datasets(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models, "synth.input.limit=3", "synth.output_format=jsonl")
    run_pass("stage1", cfg)
    from datasets import load_dataset

    ds = load_dataset(str(pass_dir(cfg, "stage1")), split="train")
    assert ds.num_rows == 3 and ds["prompt_id"] == ["tiny-000", "tiny-001", "tiny-002"]
    written = pairs_stage1(cfg)["outputs"]
    assert written["preference"]["path"].endswith("train.jsonl")


def test_stage2_start(tmp_path, tiny_models):
    from avr_megatron.synth.driver import _items

    shipped = [json.loads(line)["answer"] for line in TINY.read_text().splitlines()[:3]]
    chosen = _cfg(tmp_path, tiny_models, "synth.input.limit=3")
    assert [it.y0 for it in _items("stage2", chosen, (0, 1))["items"]] == shipped
    # Stage 1 takes y0 from synth.input.fields.answer, not from the chosen column.
    stage1 = _cfg(tmp_path, tiny_models, "synth.input.limit=3", "synth.input.fields.answer=null")
    assert [it.y0 for it in _items("stage1", stage1, (0, 1))["items"]] == [None] * 3
    sample = _cfg(tmp_path, tiny_models, "synth.input.limit=3", "synth.stage2.start=sample")
    assert [it.y0 for it in _items("stage2", sample, (0, 1))["items"]] == [None] * 3
    # No chosen column: the reference start is impossible, and the run says so before any work.
    none = _cfg(tmp_path, tiny_models, "synth.input.limit=3", "synth.input.fields.chosen=null",
                "synth.pairs.mix_source_chosen=false")
    with pytest.raises(ConfigError, match="synth.stage2.start=chosen: .* synth.input.fields.chosen is not set"):
        run_pass("stage2", none)
    assert not pass_dir(none, "stage2").exists()


def test_overlong_and_undecodable_prompts_are_listed_never_stop_the_chunk(tmp_path, tiny_models, capsys):
    """One chunk holding a prompt longer than the models' context (in tokens: 1024 positions),
    a 10 MB prompt, a non-UTF-8 line, a lone-surrogate escape and an answer that does not fit
    the reward model: the chunk finishes with the good rows, the bad ones are listed by reason."""
    src = tmp_path / "prompts.jsonl"
    good = [{"id": f"ok-{i}", "prompt": f"Name a colour number {i}.", "answer": "Blue."} for i in range(2)]
    with open(src, "wb") as f:
        f.write((json.dumps(good[0]) + "\n").encode())
        f.write((json.dumps({"id": "long", "prompt": "word " * 1500, "answer": "Red."}) + "\n").encode())
        f.write((json.dumps({"id": "huge", "prompt": "x" * 10_000_000, "answer": "Red."}) + "\n").encode())
        f.write(b'{"id": "latin1", "prompt": "caf\xe9 au lait?", "answer": "Yes."}\n')
        f.write(b'{"id": "surrogate", "prompt": "half a pair \\ud800 here", "answer": "Yes."}\n')
        f.write((json.dumps({"id": "long-answer", "prompt": "Hi?", "answer": "word " * 1500}) + "\n").encode())
        f.write((json.dumps(good[1]) + "\n").encode())
    cfg = _cfg(tmp_path / "run", tiny_models, f"synth.input.path={src}", "synth.chunk_size=8",
               "synth.stage1.k=1", "synth.stage1.m=1")
    report = run_pass("stage1", cfg)
    bad = {r["row"]: r for r in report["invalid"]["records"]}
    assert sorted(bad) == [1, 2, 3, 4, 5], bad
    assert bad[1]["id"] == "long" and bad[1]["field"] == "prompt" and "tokens" in bad[1]["reason"] \
        and "policy model" in bad[1]["reason"] and "1024" in bad[1]["reason"]
    assert bad[2]["id"] == "huge" and "characters" in bad[2]["reason"]  # refused before tokenizing
    assert "not valid UTF-8" in bad[3]["reason"] and "line 4" in bad[3]["reason"] \
        and f"byte offset {src.read_bytes().index(b'caf') + 3}" in bad[3]["reason"]
    assert bad[4]["field"] == "prompt" and "lone surrogate" in bad[4]["reason"]
    assert bad[5]["field"] == "answer" and "reward model" in bad[5]["reason"]
    assert [r["prompt_id"] for r in _rows(cfg, "stage1")] == ["ok-0", "ok-1"]
    assert "invalid input records: 5" in capsys.readouterr().out
