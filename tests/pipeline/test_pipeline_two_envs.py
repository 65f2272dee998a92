"""The tiny AvR pipeline split across two real role environments, end to end: every synthesis,
pair-building and evaluation stage runs with the vLLM engine in .venv-vllm-cpu (vllm-cpu,
Python 3.11, no Megatron-Core), every training and log-prob stage in .venv (Megatron-Core, no
vLLM), chosen by `pipeline.envs.synth.python`. Neither environment could run the other's
stages, so a finished pipeline proves the split. .venv-vllm-cpu is made by
scripts/setup_vllm_cpu_venv when missing (~3 min the first time, a no-op after)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avr_megatron.pipeline.graph import STAGES, STAGE_NAMES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def synth_python() -> Path:
    setup = subprocess.run([str(REPO / "scripts" / "setup_vllm_cpu_venv")], cwd=REPO,
                           capture_output=True, text=True, timeout=1500)
    assert setup.returncode == 0, setup.stderr[-3000:]
    return REPO / ".venv-vllm-cpu" / "bin" / "python"


def _has(python: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", code], cwd="/").returncode == 0


@pytest.fixture(scope="module")
def two_env_run(synth_python, tmp_path_factory):
    from avr_megatron.testing.tiny_hf import make_tiny_llama, make_tiny_reward_model, train_tiny_tokenizer

    # Each environment lacks what the other role needs.
    assert importlib.util.find_spec("vllm") is None and importlib.util.find_spec("megatron")
    assert _has(synth_python, "vllm") and not _has(synth_python, "megatron")
    run_dir = tmp_path_factory.mktemp("avr_two_envs")
    models = run_dir / "models"
    tok = train_tiny_tokenizer(models / "tokenizer")
    # vllm-cpu's attention kernels need a head dimension of at least 32.
    shape = dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    make_tiny_llama(models / "tiny-policy", tok, **shape)
    make_tiny_reward_model(models / "tiny-reward", tok, **shape)
    vllm = [f"synth.{role}.{key}" for role in ("policy", "reward")
            for key in ("backend=vllm", "enforce_eager=true", "max_model_len=1024")]
    cmd = [sys.executable, "-m", "avr_megatron.cli.main", "pipeline", "--recipe",
           str(REPO / "recipes" / "tiny.yaml"), f"run.dir={run_dir}",
           f"pipeline.envs.synth.python={synth_python}", *vllm]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, **VLLM_ENV}, capture_output=True,
                         text=True, timeout=3000)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return run_dir, res


def test_every_stage_ran_in_its_role_environment(two_env_run, synth_python):
    import datasets

    run_dir, res = two_env_run
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert list(stages) == list(STAGE_NAMES)
    assert all(e["status"] == "done" for e in stages.values()), stages
    for stage in STAGES:
        text = (run_dir / "stages" / stage.name / "stage.yaml").read_text()
        assert f"python: {synth_python}" in text  # the envs travel with every stage config
        if stage.command[0] in ("synth", "eval"):
            assert text.count("backend: vllm") == 2, stage.name
    # Synthesis output made by the vLLM engine, read by the training stages' data.
    trees = datasets.load_dataset(str(run_dir / "synth" / "base" / "stage1"), split="train")
    assert trees.num_rows == 16 and set(trees["status"]) == {"ok"}
    for name in ("rsft", "stage1_dpo", "thought_sft", "lcdpo"):
        summary = json.loads((run_dir / "stages" / name / "train_summary.json").read_text())
        assert summary["status"] == "finished" and summary["iteration"] == 6, name
    results = json.loads((run_dir / "stages" / "eval" / "eval" / "results.json").read_text())
    assert [row["round"] for row in results["table"]] == [0, 1]
    # Training logs are plain progress lines (no tqdm fragments off a terminal).
    log = (run_dir / "stages" / "rsft" / "logs" / "main.log").read_text()
    assert "avr train sft: step 2/6 loss " in log and "\r" not in log
