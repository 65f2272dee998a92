"""`avr convert ...` and the tools/ wrappers."""

import subprocess
import sys
from pathlib import Path

from avr_megatron.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_avr_convert_both_ways_with_recipe_overrides(tmp_path, tiny_hf, capsys):
    from avr_megatron.checkpoint.dist_ckpt import read_config

    src = tiny_hf("gqa_untied")
    rc = main(["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "ckpt"),
               "--tp", "2", "--dtype", "bf16", "--no-progress", f"run.dir={tmp_path}/run",
               "model.make_vocab_size_divisible_by=64"])
    assert rc == 0, capsys.readouterr().err
    cfg = read_config(tmp_path / "ckpt")
    assert cfg.model.make_vocab_size_divisible_by == 64  # recipe keys HF does not describe
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.precision.bf16
    assert (tmp_path / "run" / "config.yaml").is_file()

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
