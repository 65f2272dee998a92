"""`avr convert ...` and the tools/ wrappers."""

import subprocess
import sys
from pathlib import Path

from avr_megatron.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_avr_convert_both_ways_with_recipe_overrides(tmp_path, tiny_hf, capsys, monkeypatch):
    import os
    import stat

    from avr_megatron.checkpoint.dist_ckpt import read_config

    src = tiny_hf("gqa_untied")
    monkeypatch.chdir(tmp_path)  # no run directory: nothing may appear in the cwd but --out
    old_umask = os.umask(0o022)
    try:
        rc = main(["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "ckpt"),
                   "--tp", "2", "--dtype", "bf16", "--no-progress",
                   "model.make_vocab_size_divisible_by=64"])
    finally:
        os.umask(old_umask)
    assert rc == 0, capsys.readouterr().err
    cfg = read_config(tmp_path / "ckpt")
    assert cfg.model.make_vocab_size_divisible_by == 64  # recipe keys HF does not describe
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.precision.bf16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no runs/default/config.yaml
    # Teammates can read the checkpoint's config (it was 0600 from mkstemp).
    mode = stat.S_IMODE((tmp_path / "ckpt" / "iter_0000000" / "config.yaml").stat().st_mode)
    assert mode == 0o644, oct(mode)

    out = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt",
                          str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "fp32",
                          "--max-shard-size", "100KB", "--no-progress", f"run.dir={tmp_path}/run"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert "mcore-to-hf: wrote" in out.stdout


def test_errors_exit_2_with_message(tmp_path, tiny_hf, capsys):
    rc = main(["convert", "hf-to-mcore", "--hf-dir", str(tiny_hf("gqa_untied")), "--out",
               str(tmp_path / "ckpt"), "--tp", "3", "--no-progress", f"run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "avr convert hf-to-mcore: error:" in err and "not divisible by --tp 3" in err
    assert not (tmp_path / "ckpt").exists()
    rc = main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "missing"), "--out",
               str(tmp_path / "hf"), f"run.dir={tmp_path}/run"])
    assert rc == 2 and "no checkpoint at" in capsys.readouterr().err
