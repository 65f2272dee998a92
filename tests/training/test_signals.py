"""Process-level faults of `avr train`: a preemption signal during start-up exits 75 (so the
Slurm wrapper requeues), and a kill -9 of the trainer leaves no process of its tree behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _start(run_dir, toy, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "avr_megatron.cli.main", "train", "sft", "--recipe",
         "recipes/tiny_sft.yaml", f"run.dir={run_dir}", f"data.train={toy / 'sft.jsonl'}",
         f"data.tokenizer={toy / 'tokenizer'}", "logging.progress_bar=false", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_during_startup_exits_75(tmp_path, toy, sig):
    proc = _start(tmp_path / "run", toy, "train.train_iters=5")
    time.sleep(1.0)  # importing torch/Megatron: long before the first step
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert f"received {sig.name} while starting" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_startup_signal_whose_exit_was_swallowed_still_exits_75(monkeypatch):
    """CI saw the handler's SystemExit swallowed ("Exception ignored in importlib's module-lock
    callback") and the run went on to finish with 0: the loop's signal scope must still exit 75."""
    from avr_megatron.training import signals

    monkeypatch.setattr(signals, "_startup_signal", None)
    signals.exit_if_preempted_while_starting()  # no start-up signal: nothing happens
    try:  # what Python does to an exception raised inside a guarded callback
        signals._exit_preempted(signal.SIGUSR1, None)
    except SystemExit:
        pass
    with pytest.raises(SystemExit) as exc:
        with signals.PreemptionSignals():
            pytest.fail("the training loop started after a start-up preemption signal")
    assert exc.value.code == signals.EXIT_PREEMPTED


def test_kill9_of_the_trainer_leaves_no_process(tmp_path, toy):
    proc = _start(tmp_path / "run", toy, "train.train_iters=100000", "checkpoint.save_interval=0")
    tree: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not tree:  # the checkpoint helper starts with the loop
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
            tree = _children(proc.pid)
        assert tree, "the trainer started no helper process"
        time.sleep(1.0)
        tree = _children(proc.pid)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        assert not [p for p in tree if _alive(p)], f"left behind: {tree}"
    finally:  # a failed run must not leave its own orphans on the machine either
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for p in tree | _children(proc.pid):
            if _alive(p) and "multiprocessing" in _cmdline(p):  # ours, not a recycled pid
                os.kill(p, signal.SIGKILL)
