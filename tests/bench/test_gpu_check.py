"""bench/gpu_check.sh stays runnable: the shell parses (and passes shellcheck where installed),
its wheel list matches the train role's lock, and its CPU dry run passes in an environment that
holds only torch, torch's dependencies and bench/gpu_check_requirements.txt, as on a GPU machine
with only torch preinstalled (CI never needs a GPU: the GPU checks are skipped there)."""

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
REQUIREMENTS = ROOT / "bench" / "gpu_check_requirements.txt"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_scripts_parse_and_pass_shellcheck():
    for script in (SCRIPT, ROOT / "bench" / "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        if shutil.which("shellcheck"):
            out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
            assert out.returncode == 0, out.stdout
    help_text = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--cpu" in help_text and "gpu_check.json" in help_text


def test_wheel_list_matches_the_train_lock():
    ours, lock = _pins(REQUIREMENTS), _pins(ROOT / "requirements" / "train.txt")
    assert ours and all(lock.get(name) == version for name, version in ours.items()), \
        {n: (v, lock.get(n)) for n, v in ours.items() if lock.get(n) != v}


def _closure(names: list[str]) -> set[str]:
    """Installed distributions `names` need, recursively (extras and other platforms' markers
    left out)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. an optional platform package not installed here
        seen.add(name)
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def _torch_only_env(dest: Path) -> Path:
    """A venv whose site-packages links exactly torch's closure and the GPU check's wheels."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = next((dest / "lib").glob("python*/site-packages"))
    dists = _closure(["torch", *_pins(REQUIREMENTS)])
    for name in dists:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists() and top not in ("..", "bin"):
                (site / top).symlink_to(src)
    return dest / "bin" / "python"


@pytest.mark.slow
def test_cpu_dry_run_with_only_torch_and_the_wheels(tmp_path):
    python = _torch_only_env(tmp_path / "env")
    probe = subprocess.run([str(python), "-c", "import transformers"], capture_output=True)
    assert probe.returncode != 0  # the environment really lacks what the GPU machine lacks
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(SCRIPT), "--cpu", "--python", str(python), "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path)})
    report = json.loads(out.read_text()) if out.exists() else None
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], report)
    checks = report["checks"]
    for name in ("local_vs_cpu", "smoke", "steps_local"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["local_vs_cpu"]["fp32"]["max_abs_logit_diff"] < 1e-5
    assert checks["steps_local"]["dpo"]["tokens_per_second"] > 0
    for name in ("te_keys", "te_load_local", "steps_te_bf16", "steps_te_fp8", "te_fp8_resume",
                 "fp8_rules"):
        assert checks[name]["status"] == "skipped", checks[name]
