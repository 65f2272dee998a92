"""Every shell script in slurm/ and scripts/ parses (bash -n) and passes shellcheck; the sbatch
scripts' dry run prints the resources and the recipe's parallel layout without a cluster."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import REPO

SCRIPTS = sorted(p for d in ("slurm", "scripts") for p in (REPO / d).rglob("*")
                 if p.is_file() and p.read_bytes()[:2] == b"#!"
                 and b"bash" in p.read_bytes().split(b"\n", 1)[0])


def _shellcheck() -> str:
    exe = shutil.which("shellcheck")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck"],
                       env=env, capture_output=True, timeout=300)
        if shutil.which("shellcheck") is None:  # stale package lists
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            "shellcheck"], env=env, capture_output=True, timeout=300)
        exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed and cannot be installed (needs root and apt-get)")
    return exe


def test_scripts_found():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"slurm/avr_70b.sh", "slurm/avr_8b.sh", "slurm/lib/avr_job.sh",
            "slurm/local_cluster.sh", "scripts/test"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck():
    r = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def _dryrun(script: str, recipe: str | None, *overrides: str, **env):
    full = {**os.environ, "DRYRUN": "1", "PYTHONWARNINGS": "ignore",
            "AVR_PYTHON": f"env PYTHONPATH={REPO} {sys.executable}", **env}
    full.pop("SLURM_JOB_ID", None)
    if recipe:
        full["AVR_RECIPE"] = recipe
    return subprocess.run(["bash", f"slurm/{script}", *overrides], capture_output=True, text=True,
                          cwd=REPO, env=full, timeout=120)


def test_dryrun_tiny_recipe_prints_resources_and_layout(tmp_path):
    r = _dryrun("avr_70b.sh", "recipes/tiny_sft.yaml", f"run.dir={tmp_path}",
                "parallel.tensor_model_parallel_size=2", "train.global_batch_size=64",
                STAGE="dpo")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "stage:     dpo (avr train dpo)" in out
    assert "8 node(s) x 8 task(s) per node = 64 processes" in out
    assert "GPUs per node: 8, time limit: 04:00:00" in out
    assert "--signal=B:USR1@600" in out and "--requeue" in out
    assert "layout: world=64 TP=2 PP=1 VPP=None CP=1 DP=32" in out
    assert "avr_megatron.cli.main train dpo --recipe recipes/tiny_sft.yaml" in out
    assert f"logs:      {tmp_path}/logs/dpo." in out
    assert not any(tmp_path.iterdir())  # nothing written, nothing run


def test_dryrun_refuses_a_layout_that_does_not_fit(tmp_path):
    r = _dryrun("avr_8b.sh", "recipes/tiny_sft.yaml", f"run.dir={tmp_path}",
                "parallel.pipeline_model_parallel_size=3", "model.num_layers=3")
    assert r.returncode == 2, r.stderr
    assert "parallel.pipeline_model_parallel_size=3" in r.stderr
    assert "world size 8 is not divisible by" in r.stderr


def test_unknown_stage_is_refused(tmp_path):
    r = _dryrun("avr_8b.sh", "recipes/tiny_sft.yaml", f"run.dir={tmp_path}", STAGE="pretrain")
    assert r.returncode == 2 and "STAGE=pretrain is not one of" in r.stderr


@pytest.mark.parametrize("script,recipe,nodes", [("avr_70b.sh", "llama3_70b", 8),
                                                 ("avr_8b.sh", "llama3_8b", 1)])
def test_dryrun_with_its_own_recipe(script, recipe, nodes, tmp_path):
    if not (REPO / "recipes" / f"{recipe}.yaml").is_file():
        pytest.skip(f"recipes/{recipe}.yaml is not in this checkout yet")
    r = _dryrun(script, None, f"run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert f"{nodes} node(s) x 8 task(s) per node = {nodes * 8} processes" in r.stdout
    assert f"recipe:    recipes/{recipe}.yaml" in r.stdout
    assert "layout: world=" in r.stdout and " TP=" in r.stdout and " DP=" in r.stdout


def _fresh_clone(tmp_path) -> Path:
    """A clean clone of this checkout (committed files only; scripts copied from the working tree
    so uncommitted edits are what is tested)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    for p in SCRIPTS + [REPO / "recipes" / "llama3_base.yaml"]:
        shutil.copy(p, clone / p.relative_to(REPO))
    return clone


def _bare_env(**env):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("AVR_", "SLURM_")) and k not in ("STAGE", "DRYRUN")}
    return {**full, "PYTHONWARNINGS": "ignore", **env}


def test_fresh_clone_without_an_environment_names_avr_python(tmp_path):
    clone = _fresh_clone(tmp_path)
    r = subprocess.run(["bash", "slurm/avr_8b.sh"], cwd=clone, env=_bare_env(DRYRUN="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"no Python environment: {clone}/.venv does not exist and AVR_PYTHON is not set" \
        in r.stderr
    r = subprocess.run(["bash", "slurm/avr_8b.sh"], cwd=clone, capture_output=True, text=True,
                       env=_bare_env(DRYRUN="1", AVR_PYTHON="/bin/false"), timeout=120)
    assert r.returncode == 2 and "AVR_PYTHON=/bin/false cannot import avr_megatron" in r.stderr


@pytest.mark.parametrize("script,nodes", [("avr_8b.sh", 1), ("avr_70b.sh", 8)])
def test_fresh_clone_dryrun_uses_the_repository_environment(script, nodes, tmp_path):
    """No variables set: the repository's .venv reads the recipe; the plan is printed."""
    clone = _fresh_clone(tmp_path)
    (clone / ".venv").symlink_to(Path(sys.prefix))  # stands in for the env the README makes
    r = subprocess.run(["bash", f"slurm/{script}", f"run.dir={tmp_path}/run"], cwd=clone,
                       env=_bare_env(DRYRUN="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{nodes} node(s) x 8 task(s) per node" in r.stdout
    assert f"python:    {clone}/.venv/bin/python (reads the recipe)" in r.stdout
    assert f"command:   srun --kill-on-bad-exit=1 {clone}/.venv/bin/python -m " in r.stdout


def test_placeholders_refused_naming_the_key_and_warned_in_a_dry_run(tmp_path):
    """AVR_CMD="synth stage1" reads synth.*: the recipe's /path/to placeholders there stop the
    job before srun (outside a job the plan is still checked first); a dry run warns."""
    env = dict(AVR_PYTHON=f"env PYTHONPATH={REPO} {sys.executable}", AVR_CMD="synth stage1")
    r = subprocess.run(["bash", "slurm/avr_8b.sh", f"run.dir={tmp_path}"], cwd=REPO,
                       env=_bare_env(**env), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "placeholder values" in r.stderr and "synth.reward.model=/path/to/reward-model" \
        in r.stderr and "not inside a Slurm job" not in r.stderr
    r = subprocess.run(["bash", "slurm/avr_8b.sh", f"run.dir={tmp_path}"], cwd=REPO,
                       env=_bare_env(DRYRUN="1", **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "WARNING: placeholder synth.input.path=/path/to/prompts.jsonl" in r.stderr
    assert "stage:     synth_stage1 (avr synth stage1)" in r.stdout


def test_container_dryrun(tmp_path):
    r = _dryrun("avr_8b.sh", None, f"run.dir={tmp_path}", AVR_CONTAINER_IMAGE="/img/train.sqsh",
                AVR_CONTAINER_MOUNTS="/lustre:/lustre")
    assert r.returncode == 0, r.stderr
    assert (f"srun --kill-on-bad-exit=1 --container-image=/img/train.sqsh --container-workdir="
            f"{REPO} --container-mounts=/lustre:/lustre python -m avr_megatron.cli.main train sft"
            in r.stdout)
