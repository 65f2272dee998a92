import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def avr(*args, env=None, timeout=600, umask=None):
    return subprocess.run([sys.executable, "-m", "avr_megatron.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def test_info_json():
    out = avr("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["versions"]["megatron-core"].startswith("0.19")
    assert info["code_paths"]["layer_spec"] in ("local", "transformer_engine")
    assert info["roles"]["launch"]["complete"] and info["roles"]["train"]["usable"]


def test_info_role_lists_packages_and_checks():
    out = avr("info", "--role", "train", "--check")
    assert out.returncode == 0, out.stderr  # only GPU-only packages are missing on CPU
    assert "role train" in out.stdout and "present    megatron-core 0.19" in out.stdout
    assert "missing    transformer-engine" in out.stdout and "(GPU only)" in out.stdout


def test_bad_override_exits_2_naming_key(tmp_path):
    out = avr("smoke", "--recipe", "recipes/tiny.yaml", "model.num_layer=3",
              f"run.dir={tmp_path}")
    assert out.returncode == 2
    assert "unknown key 'model.num_layer'" in out.stderr


def test_smoke_writes_config_and_summary(tmp_path):
    from avr_megatron.runtime.files import owner_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().rsplit("-", 1)[0]
    (tmp_path / f".train_summary.json.{host}-{dead.pid}.tmp").write_text("killed mid-write")
    out = avr("smoke", "--recipe", "recipes/tiny.yaml", f"run.dir={tmp_path}",
              "train.train_iters=30", umask=0o022)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] * 0.6
    assert "train_iters: 30" in (tmp_path / "config.yaml").read_text()
    # Teammates on a shared file system can read the run's files (mkstemp would give 0600),
    # and no temporary is left behind (a killed run's is removed).
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert modes["config.yaml"] == modes["smoke_summary.json"] == 0o644, modes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_smoke_under_torchrun_pipeline_parallel(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "avr_megatron.cli.main", "smoke", "--recipe", "recipes/tiny.yaml",
           f"run.dir={tmp_path}", "parallel.pipeline_model_parallel_size=2",
           "train.train_iters=10"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert summary["layout"]["pp"] == 2 and summary["last_loss"] < summary["first_loss"]
