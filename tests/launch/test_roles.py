"""Role environments: each lock file (requirements/<role>.txt) still satisfies what
pyproject.toml asks of its role, and keeps the role contract (no Megatron/TE in synth, no torch
in launch). A static check with `packaging`, no network: the full resolution is checked by
`scripts/lock_roles --verify` when the locks are regenerated."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from avr_megatron.launch import roles

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("role", roles.ROLES)
def test_lock_matches_pyproject(role):
    lock = ROOT / "requirements" / f"{role}.txt"
    assert lock.is_file(), f"{lock} is missing: run scripts/lock_roles {role}"
    problems = roles.check_lock(role, lock)
    assert not problems, ("requirements/%s.txt no longer matches pyproject.toml; run "
                          "scripts/lock_roles %s\n%s" % (role, role, "\n".join(problems)))


def test_role_requirements_follow_extras_and_contract():
    synth = {r.name for r in roles.role_requirements("synth")}
    train = {r.name for r in roles.role_requirements("train")}
    launch = {r.name for r in roles.role_requirements("launch")}
    assert {"vllm", "transformers", "datasets", "omegaconf"} <= synth
    assert not synth & {"megatron-core", "transformer-engine"}
    assert {"megatron-core", "torch", "transformer-engine", "transformers"} <= train
    assert {"nemo-run", "leptonai", "omegaconf"} <= launch and "torch" not in launch
    with pytest.raises(ValueError, match="unknown role"):
        roles.role_requirements("gpu")


def _pyproject(tmp_path, extras: str) -> Path:
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname = "avr-megatron"\ndependencies = ["omegaconf>=2.4,<2.5"]\n'
                 "[project.optional-dependencies]\n" + extras)
    return p


def test_check_lock_names_what_is_wrong(tmp_path):
    pyproject = _pyproject(tmp_path, 'hf = ["transformers>=5.19"]\n'
                           'synth = ["avr-megatron[hf]", "vllm>=0.33,<0.34"]\n'
                           'launch = ["nemo-run==0.11.1"]\n'
                           'train = ["transformer-engine[pytorch]>=2.20"]\n')
    lock = tmp_path / "synth.txt"
    lock.write_text("# header\nomegaconf==2.4.0\n    # via x\ntransformers==5.20.2\nvllm==0.33.0\n")
    assert roles.check_lock("synth", lock, pyproject) == []
    lock.write_text("omegaconf==2.4.0\ntransformers==5.18.0\nmegatron-core==0.19.2\n")
    problems = roles.check_lock("synth", lock, pyproject)
    assert "synth.txt: transformers==5.18.0 does not satisfy transformers>=5.19" in problems
    assert "synth.txt: vllm<0.34,>=0.33 is not pinned" in problems
    assert any("pins megatron-core, which the synth role must not install" in p for p in problems)
    lock.write_text("omegaconf==2.4.0\nnemo-run==0.11.1\ntorch==2.13.0\n")
    assert roles.check_lock("launch", lock, pyproject) == [
        "synth.txt: pins torch, which the launch role must not install"]
    lock.write_text("omegaconf==2.4.0\ntransformer-engine==2.20.2\n")
    assert roles.check_lock("train", lock, pyproject) == [
        "synth.txt: transformer-engine[pytorch] needs transformer-engine-torch, which is not "
        "pinned"]
    lock.write_text("omegaconf>=2.4\n")
    with pytest.raises(ValueError, match="not pinned with =="):
        roles.read_lock(lock)


def test_metadata_fallback_matches_pyproject(monkeypatch):
    """In an installed package (a container image) the roles come from its metadata."""
    base, extras = roles.project_requirements()
    lines = list(base) + [f'{r}; extra == "{e}"' for e, rs in extras.items() for r in rs]
    monkeypatch.setattr(roles, "_pyproject", lambda: None)
    monkeypatch.setattr(roles.importlib.metadata, "requires", lambda name: lines)
    assert [str(r) for r in roles.role_requirements("train")] == [
        str(Requirement(str(r))) for r in roles.role_requirements("train", ROOT / "pyproject.toml")]


def test_role_status_of_this_interpreter():
    """The CPU test environment (.venv) has the launch role complete; train misses only
    Transformer Engine (GPU only), so it is usable here."""
    launch, train = roles.role_status("launch"), roles.role_status("train")
    assert launch["complete"], launch
    assert train["usable"] and not train["complete"]
    assert [m.split("[")[0] for m in train["missing"]] == ["transformer-engine"]
    assert train["missing"][0].endswith(" (GPU only)")


# Imports of packages requirements/launch.txt does not pin: `avr pipeline` must not need them.
NOT_IN_LAUNCH = {"torch": "torch", "megatron": "megatron-core",
                 "transformer_engine": "transformer-engine", "vllm": "vllm",
                 "transformers": "transformers", "datasets": "datasets", "pyarrow": "pyarrow",
                 "numpy": "numpy", "tokenizers": "tokenizers", "safetensors": "safetensors",
                 "matplotlib": "matplotlib", "tensorboard": "tensorboard", "triton": "triton"}


def test_blocked_modules_are_really_absent_from_the_launch_lock():
    pins = roles.read_lock(ROOT / "requirements" / "launch.txt")
    assert not set(NOT_IN_LAUNCH.values()) & set(pins)
_BLOCKED_MAIN = """
import sys
from avr_megatron.testing.import_block import block
block(*sys.argv[1].split(","))
sys.argv = ["avr", *sys.argv[2:]]
from avr_megatron.cli.main import main
sys.exit(main())
"""


def _avr_without(blocked, *args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _BLOCKED_MAIN, ",".join(blocked), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_pipeline_and_info_run_in_the_launch_role(tmp_path):
    """The launch environment has nemo-run and no torch / HF / data packages: `avr pipeline`
    (list, Slurm dry run) and `avr info` work there."""
    r = _avr_without(NOT_IN_LAUNCH, "pipeline", "--recipe", "recipes/llama3_8b.yaml", "--dryrun",
                     "--executor", "slurm", f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## stage lcdpo" in r.stdout and "#SBATCH --nodes=1" in r.stdout
    r = _avr_without(NOT_IN_LAUNCH, "pipeline", "--recipe", "recipes/tiny.yaml", "--list")
    assert r.returncode == 0 and "stage2_thoughts" in r.stdout, r.stderr[-3000:]
    r = _avr_without(NOT_IN_LAUNCH, "info")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch is not installed: not a training environment" in r.stdout
    assert "launch               complete" in r.stdout
