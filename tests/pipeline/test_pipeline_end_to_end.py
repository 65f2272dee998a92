"""The tiny AvR pipeline end to end, as a user runs it (`avr pipeline --recipe recipes/tiny.yaml`,
NeMo-Run LocalExecutor): every stage's outputs, a rerun that skips everything, and a run killed
mid-stage that resumes to the same outputs as the uninterrupted one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avr_megatron.pipeline.graph import STAGE_NAMES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def avr_pipeline(run_dir: Path, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "avr_megatron.cli.main", "pipeline", "--recipe",
           str(REPO / "recipes" / "tiny.yaml"), f"run.dir={run_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **popen)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())["stages"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avr_tiny")
    res = avr_pipeline(run_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run_dir, res


def test_every_stage_ran_and_wrote_its_outputs(full_run):
    import datasets
    from transformers import AutoModelForCausalLM

    run_dir, res = full_run
    stages = manifest(run_dir)
    assert list(stages) == list(STAGE_NAMES)
    for name, e in stages.items():
        assert e["status"] == "done", name
        assert e["outputs"] and all(fp is not None for fp in e["outputs"].values()), name
        assert (run_dir / "stages" / name / "stage.yaml").is_file()
        assert (run_dir / "stages" / name / "logs" / "main.log").is_file()
    # Datasets: SFT conversations and preference pairs that `datasets` reads.
    for root, kind in [("base", "stage1"), ("onpolicy", "stage1"), ("lcdpo", "stage2")]:
        pref = datasets.load_dataset(str(run_dir / "data" / root / kind / "preference"), split="train")
        assert pref.num_rows > 0 and {"chosen", "rejected", "prompt"} <= set(pref.column_names)
    for root, kind in [("base", "stage1"), ("thought_sft", "stage2")]:
        sft = datasets.load_dataset(str(run_dir / "data" / root / kind / "sft"), split="train")
        assert sft.num_rows > 0 and "messages" in sft.column_names
    # The method's reference defaults. Stage-1 pairs: every response / improvement pair's chosen
    # answer is at or above r(y0), and a prompt has other pairs only with its response pair.
    for root in ("base", "onpolicy"):
        pairs = datasets.load_dataset(str(run_dir / "data" / root / "stage1" / "preference"), split="train").to_list()
        assert all(p["reward_chosen"] >= p["reward_base"] for p in pairs if p["pair_type"] != "criticism")
        with_response = {p["prompt_id"] for p in pairs if p["pair_type"] == "response"}
        assert {p["prompt_id"] for p in pairs} == with_response
        report = json.loads((run_dir / "data" / root / "stage1" / "summary.json").read_text())
        assert report["pair_rules"] == "reference" and "duplicates_removed" in report["report"]
    # RSFT data: y0 is the shipped ("chosen") answer, so each of the 16 prompts gives exactly one
    # conversation: its RSFT example, or else its chosen conversation.
    rsft = datasets.load_dataset(str(run_dir / "data" / "base" / "stage1" / "sft"), split="train")
    assert rsft.num_rows == 16 and set(rsft["kind"]) <= {"rsft", "source"}
    assert len(set(rsft["prompt_id"])) == 16
    # Stage 2 starts from the shipped answers, and thought pairs beat their reward.
    shipped = {json.loads(line)["id"]: json.loads(line)["answer"]
               for line in (REPO / "data" / "prompts" / "tiny_prompts.jsonl").read_text().splitlines()}
    searches = datasets.load_dataset(str(run_dir / "synth" / "stage2" / "stage2"), split="train").to_list()
    assert searches and all(r["y0"] == shipped[r["prompt_id"]] for r in searches)
    source_reward = {r["prompt_id"]: r["reward_y0"] for r in searches}
    for p in datasets.load_dataset(str(run_dir / "data" / "lcdpo" / "stage2" / "preference"), split="train"):
        assert p["reward_base"] == source_reward[p["prompt_id"]] < p["reward_chosen"]
    # Training stages: summaries, checkpoints and loadable HF exports.
    for name in ("rsft", "stage1_dpo", "thought_sft", "lcdpo"):
        summary = json.loads((run_dir / "stages" / name / "train_summary.json").read_text())
        assert summary["status"] == "finished" and summary["iteration"] == 6, name
        assert stages[name]["summary"]["iterations"] == 6
        model = AutoModelForCausalLM.from_pretrained(run_dir / "models" / name)
        assert model.config.num_hidden_layers >= 1
    assert stages["stage1_dpo"]["summary"]["accuracy"] is not None
    for logps in ("data/onpolicy/stage1/preference.ref_logps", "data/lcdpo/stage2/preference.ref_logps"):
        assert any((run_dir / logps).iterdir())
    # Evaluation: table, plot, export, and the final model's figures in the manifest.
    ev = run_dir / "stages" / "eval" / "eval"
    results = json.loads((ev / "results.json").read_text())
    assert [row["round"] for row in results["table"]] == [0, 1]
    assert (ev / "rewards_vs_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = json.loads(next((ev / "alpaca_eval").glob("*_round1.json")).read_text())
    assert export and {"instruction", "output", "generator"} <= set(export[0])
    assert stages["eval"]["summary"]["rounds"] == 1
    # The final table names every stage.
    assert all(name in res.stdout for name in STAGE_NAMES)


def test_rerun_skips_every_stage(full_run):
    run_dir, _ = full_run
    before = manifest(run_dir)
    res = avr_pipeline(run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("up to date, skipped") == len(STAGE_NAMES)
    assert manifest(run_dir) == before


def test_killed_run_resumes_to_the_same_outputs(full_run, tmp_path):
    full, _ = full_run
    run_dir = tmp_path / "killed"
    shutil.copytree(full / "models", run_dir / "models",
                    ignore=lambda d, names: [n for n in names if n not in ("tiny-policy", "tiny-reward")]
                    if Path(d) == full / "models" else [])
    proc = avr_pipeline(run_dir, "--to", "stage1_dpo", start_new_session=True)
    checkpoints = run_dir / "stages" / "rsft" / "checkpoints"
    deadline = time.time() + 600
    while not any(checkpoints.glob("iter_*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline dies; the stage's own processes are left
    proc.wait()
    assert manifest(run_dir)["rsft"]["status"] == "running"
    res = avr_pipeline(run_dir, "--to", "stage1_dpo")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "stage1_trees_base: up to date, skipped" in res.stdout
    resumed, reference = manifest(run_dir), manifest(full)
    rsft = json.loads((run_dir / "stages" / "rsft" / "train_summary.json").read_text())
    assert rsft["init"] == "resume" and rsft["started_at_iteration"] > 0  # from its checkpoint
    for name in STAGE_NAMES[:STAGE_NAMES.index("stage1_dpo") + 1]:
        assert resumed[name]["status"] == "done"
        mine = {Path(p).relative_to(run_dir): fp for p, fp in resumed[name]["outputs"].items()}
        theirs = {Path(p).relative_to(full): fp for p, fp in reference[name]["outputs"].items()}
        assert mine == theirs, name
