"""A corrupted newest checkpoint (truncated data file, garbled metadata) does not stop a resume:
the previous intact one is used, with a warning naming the bad one, and the run continues with
exactly the losses of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _train(run_dir, toy, iters):
    return subprocess.run(
        [sys.executable, "-m", "avr_megatron.cli.main", "train", "sft", "--recipe",
         "recipes/tiny_sft.yaml", f"run.dir={run_dir}", f"data.train={toy / 'sft.jsonl'}",
         f"data.tokenizer={toy / 'tokenizer'}", f"train.train_iters={iters}",
         "checkpoint.save_interval=1", "logging.progress_bar=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows}


def _truncate(ckpt: Path):
    data = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def _garble(ckpt: Path):
    (ckpt / ".metadata").write_bytes(b"\x80\x04not a pickle at all")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy):
    """The losses of an uninterrupted 3-step run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    out = _train(run, toy, 3)
    assert out.returncode == 0, out.stderr[-3000:]
    return _losses(run)


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, toy, reference, damage):
    run = tmp_path / "run"
    first = _train(run, toy, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_0000001",
                                                                           "iter_0000002"]
    damage(run / "checkpoints" / "iter_0000002")
    partial = run / "checkpoints" / ".iter_0000009.tmp"  # a save a kill -9 interrupted
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 4096)
    second = _train(run, toy, 3)
    assert second.returncode == 0, second.stderr[-3000:]
    bad = run / "checkpoints" / "iter_0000002"
    assert f"checkpoint {bad} cannot be loaded" in second.stderr
    assert f"falling back to the previous one, {run / 'checkpoints' / 'iter_0000001'}" in second.stderr
    assert f"resumed from {run / 'checkpoints' / 'iter_0000001'} at iteration 1" in second.stderr
    assert _losses(run) == reference  # iteration 2 redone, 3 as uninterrupted
    assert not partial.exists()  # removed by the next save


def test_keep_last_keeps_a_fallback_by_default():
    from avr_megatron.config import load_config

    assert load_config(None, []).checkpoint.keep_last >= 2
