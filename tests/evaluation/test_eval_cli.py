"""`avr eval` through the CLI with tiny random transformers models (the tiny recipe's wiring)."""

import json
import math
from pathlib import Path

import pytest

from avr_megatron.cli.commands import COMMANDS
from avr_megatron.cli.main import main

RECIPE = str(Path(__file__).parents[2] / "recipes" / "tiny.yaml")
PROMPTS = Path(__file__).parents[2] / "data" / "prompts" / "tiny_prompts.jsonl"


def args(tmp_path, tiny_models, *extra):
    policy, reward = tiny_models
    return ["eval", "--recipe", RECIPE, f"run.dir={tmp_path}", f"synth.reward.model={reward}",
            f"eval.model={policy}", "eval.limit=5", "eval.sampling.max_tokens=12", "eval.progress=false", *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_is_registered():
    assert ("eval",) in {c.path for c in COMMANDS}


@pytest.mark.slow
def test_eval_cli_writes_table_plot_export_and_results(tmp_path, tiny_models, capsys):
    policy, _ = tiny_models
    assert main(args(tmp_path, tiny_models, f"eval.baseline_model={policy}", "eval.baseline_generator=seed",
                     "eval.rounds=2")) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "eval"
    res = json.loads((out / "results.json").read_text())
    assert res["rounds"] == 2 and len(res["table"]) == 3 and res["prompts"]["valid"] == 5
    assert "avr eval: policy vs seed" in printed

    # The win rate of each round, recomputed from the answer files.
    base = rows(out / "answers" / "baseline.jsonl")
    for r, summary in enumerate(res["table"]):
        model = rows(out / "answers" / f"round{r}.jsonl")
        assert [m["prompt_id"] for m in model] == [b["prompt_id"] for b in base]
        pairs = [(m["reward"], b["reward"]) for m, b in zip(model, base)]
        wins = sum(1 for m, b in pairs if m is not None and (b is None or m > b))
        ties = sum(1 for m, b in pairs if m == b)
        w = summary["win_rate"]
        assert (w["wins"], w["ties"], w["n"]) == (wins, ties, 5)
        assert w["low"] <= w["rate"] <= w["high"]
        present = [m["reward"] for m in model if m["reward"] is not None]
        assert summary["mean_reward"]["mean"] == pytest.approx(math.fsum(present) / len(present))

    # Table (Markdown and terminal), plot, exports.
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 4 and "Baseline `seed`" in table
    from matplotlib.image import imread

    png = out / "rewards_vs_rounds.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[0] > 100
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:5]]
    for r in range(3):
        export = json.loads((out / "alpaca_eval" / f"policy_round{r}.json").read_text())
        assert isinstance(export, list) and [e["instruction"] for e in export] == prompts
        assert all(set(e) == {"instruction", "output", "generator"} and isinstance(e["output"], str) for e in export)
    assert json.loads((out / "alpaca_eval" / "seed.json").read_text())[0]["generator"] == "seed"

    # The answer files load with datasets.
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out / "answers" / "round1.jsonl"), split="train")
    assert len(ds) == 5 and "criticism" in ds.column_names


@pytest.mark.slow
def test_long_thought_on_a_random_model_counts_malformed_thoughts(tmp_path, tiny_models):
    assert main(args(tmp_path, tiny_models, "eval.long_thought=true", "eval.rounds=1")) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    r0 = rows(tmp_path / "eval" / "answers" / "round0.jsonl")
    answered = [r for r in r0 if r["answer"] is not None]
    assert answered, "the random model gave no answer at all"
    assert res["table"][0]["no_final_answer"] == sum(r["final_answer_found"] is False for r in r0) > 0
    assert res["table"][0]["malformed"] >= res["table"][0]["no_final_answer"]
    assert res["table"][0]["win_rate"] is None and res["baseline"] is None
    assert (tmp_path / "eval" / "rewards_vs_rounds.png").exists()


def test_bad_input_errors_name_the_key(tmp_path, tiny_models, capsys):
    assert main(args(tmp_path, tiny_models, "eval.rounds=-1")) == 2
    assert "eval.rounds=-1 must be >= 0" in capsys.readouterr().err
    assert main(args(tmp_path, tiny_models, f"eval.model={tmp_path / 'missing'}")) == 2
    assert "eval.model=" in (err := capsys.readouterr().err) and "no such model directory" in err
    assert main(args(tmp_path, tiny_models, f"eval.baseline_model={tmp_path / 'nope'}")) == 2
    assert "eval.baseline_model=" in capsys.readouterr().err
    assert main(args(tmp_path, tiny_models, "eval.model=null")) == 2
    assert "eval.model is not set" in capsys.readouterr().err
    assert main(args(tmp_path, tiny_models, f"eval.prompts={tmp_path / 'none.jsonl'}")) == 2
    assert "eval.prompts=" in (err := capsys.readouterr().err) and "no such file" in err
    assert main(args(tmp_path, tiny_models, "eval.confidence=1.5", "eval.sampling.top_p=0")) == 2
    err = capsys.readouterr().err
    assert "eval.confidence=1.5" in err and "eval.sampling.top_p" in err
