"""A full or read-only disk: the command exits 74 with a message naming the path, the problem,
what was kept and how to resume; the state left behind resumes once space is back.

The disk is a small tmpfs mounted for the test (root, as on our machines and in CI's
container). Without the right to mount, the full disk is emulated with RLIMIT_FSIZE (writes
past the limit fail with EFBIG: the same code path, another problem named) and the read-only
case with a directory without write permission (non-root only)."""

import json
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _can_mount(tmp: Path) -> bool:
    probe = tmp / "mount-probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


@pytest.fixture(scope="module")
def mode(tmp_path_factory):
    return "tmpfs" if _can_mount(tmp_path_factory.mktemp("probe")) else "rlimit"


@contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _avr(*args, fsize: int | None = None):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "avr_megatron.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=limit if fsize else None)


def _train(run, toy, iters, **kw):
    return _avr("train", "sft", "--recipe", "recipes/tiny_sft.yaml", f"run.dir={run}",
                f"data.train={toy / 'sft.jsonl'}", f"data.tokenizer={toy / 'tokenizer'}",
                f"train.train_iters={iters}", "checkpoint.save_interval=1",
                "logging.progress_bar=false", **kw)


def test_training_on_a_full_disk_names_it_keeps_the_last_checkpoint_and_resumes(tmp_path, toy, mode):
    if mode == "tmpfs":
        with small_disk(tmp_path / "disk", "4m") as disk:  # room for one checkpoint (~2.4 MB)
            run = disk / "run"
            out = _train(run, toy, 4)
            err = out.stderr
            assert out.returncode == 74, err[-3000:]
            assert f"cannot write {run}/checkpoints/.iter_0000002.tmp: the disk is full" in err
            assert f"Kept: the previous checkpoint {run}/checkpoints/iter_0000001" in err
            assert "rerun the same command: it resumes from iter_0000001" in err
            assert "Traceback" not in err.split("avr train sft: error:")[-1]
            summary = json.loads((run / "train_summary.json").read_text())
            assert summary["status"] == "failed" and "disk is full" in summary["error"]
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000001", "latest"]
            _remount(disk, "size=64m")
            again = _train(run, toy, 4)
            assert again.returncode == 0, again.stderr[-3000:]
            assert f"resumed from {run}/checkpoints/iter_0000001 at iteration 1" in again.stderr
    else:
        run = tmp_path / "run"
        out = _train(run, toy, 4, fsize=1 << 20)  # a checkpoint's data file is ~2.4 MB
        assert out.returncode == 74, out.stderr[-3000:]
        assert f"cannot write {run}/checkpoints/.iter_0000001.tmp: the file size limit" in out.stderr
        assert "Kept: no checkpoint" in out.stderr
        again = _train(run, toy, 4)
        assert again.returncode == 0, again.stderr[-3000:]


def test_training_on_a_read_only_disk_names_it(tmp_path, toy, mode):
    if mode == "tmpfs":
        with small_disk(tmp_path / "disk", "64m") as disk:
            run = disk / "run"
            assert _train(run, toy, 1).returncode == 0
            _remount(disk, "ro")
            out = _train(run, toy, 2)
            assert out.returncode == 74, out.stderr[-3000:]
            assert f"cannot write {run}/config.yaml: the file system is read-only" in out.stderr
            _remount(disk, "rw")
            again = _train(run, toy, 2)
            assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    elif os.geteuid() != 0:
        run = tmp_path / "run"
        assert _train(run, toy, 1).returncode == 0
        for d in (run, run / "checkpoints"):
            d.chmod(0o555)
        out = _train(run, toy, 2)
        assert out.returncode == 74, out.stderr[-3000:]
        assert f"cannot write {run}/config.yaml: the directory is not writable" in out.stderr
    else:
        pytest.skip("root without the right to mount: cannot make a read-only directory")


def test_conversion_on_a_full_disk_leaves_nothing(tmp_path, mode):
    from avr_megatron.testing.tiny_hf import make_tiny_llama, train_tiny_tokenizer

    hf = make_tiny_llama(tmp_path / "hf", train_tiny_tokenizer(tmp_path / "tok"))
    args = ["convert", "hf-to-mcore", "--hf-dir", str(hf), "--no-progress"]
    if mode == "tmpfs":
        with small_disk(tmp_path / "disk", "256k") as disk:
            out = _avr(*args, "--out", str(disk / "ckpt"))
            assert out.returncode == 74, out.stderr[-3000:]
            assert "the disk is full" in out.stderr and f"Kept: nothing at {disk / 'ckpt'}" in out.stderr
            assert list(disk.iterdir()) == []  # the partial output was removed
    else:
        out = _avr(*args, "--out", str(tmp_path / "ckpt"), fsize=128 << 10)
        assert out.returncode == 74 and "file size limit" in out.stderr, out.stderr[-3000:]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


def test_synthesis_on_a_full_disk_keeps_finished_chunks(tmp_path, tiny_models, mode):
    if mode != "tmpfs":
        pytest.skip("needs a mountable tmpfs (chunk files are too small for RLIMIT_FSIZE)")
    policy, reward = tiny_models
    prompts = REPO / "data" / "prompts" / "tiny_prompts.jsonl"
    with small_disk(tmp_path / "disk", "64k") as disk:  # a few of the six ~16 KB chunk files
        run = disk / "run"
        args = ["synth", "stage1", "--recipe", "recipes/tiny.yaml", f"run.dir={run}",
                f"synth.policy.model={policy}", f"synth.reward.model={reward}",
                f"synth.input.path={prompts}", "synth.input.limit=12", "synth.chunk_size=2",
                "synth.stage1.k=1", "synth.stage1.m=1", "synth.progress=false"]
        first = _avr(*args)
        assert first.returncode == 74, first.stderr[-3000:]
        assert "the disk is full" in first.stderr and "finished chunk file(s)" in first.stderr
        assert "finished chunks are skipped" in first.stderr
        _remount(disk, "size=64m")
        again = _avr(*args)
        assert again.returncode == 0, again.stderr[-3000:]
        done = sorted(p.name for p in (run / "synth" / "stage1" / "data").iterdir())
        assert len(done) == 6 and not [n for n in done if n.startswith(".")]
