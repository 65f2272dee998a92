"""Fault tolerance through the CLI: `avr logps` stores reference log-probs; a DPO run stopped by
SIGTERM (checkpoint + exit 75) and later killed with SIGKILL, each time resumed, ends with
exactly the loss curve of an uninterrupted run. Stale stored log-probs are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
from avr_megatron.testing.toy_data import preference_records, write_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ITERS = 16


def _cmd(*args):
    return [sys.executable, "-m", "avr_megatron.cli.main", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows], [r["loss"] for r in rows]


def _run_until(args, run_dir, iteration, sig):
    """Start a run in its own process group; once metrics.jsonl shows `iteration`, send `sig` to
    the whole group, as Slurm does to a job step (the main process and its checkpoint-writer
    helpers); return the exit code, the last logged iteration then, and the output."""
    log_path = Path(run_dir).with_name(Path(run_dir).name + f".{int(sig)}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        metrics = Path(run_dir) / "metrics.jsonl"
        seen = 0
        deadline = time.time() + 300
        try:
            while proc.poll() is None and time.time() < deadline:
                if metrics.is_file():
                    lines = metrics.read_text().splitlines()
                    seen = json.loads(lines[-1])["iteration"] if lines else 0
                    if seen >= iteration:
                        os.killpg(proc.pid, sig)
                        break
                time.sleep(0.01)
            proc.wait(timeout=300)
        finally:
            try:  # never leave helpers of this test behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, seen, log_path.read_text()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    train_tiny_tokenizer(tmp / "tok")
    write_jsonl(preference_records(48, seed=2), tmp / "pairs.jsonl")
    common = ["--recipe", str(REPO / "recipes" / "tiny.yaml"), f"data.train={tmp / 'pairs.jsonl'}",
              f"data.tokenizer={tmp / 'tok'}", "train.seq_length=128", "train.micro_batch_size=2",
              "train.global_batch_size=4", f"train.train_iters={ITERS}", "optimizer.lr=2e-3",
              "logging.progress_bar=false"]
    out = subprocess.run(_cmd("logps", *common, f"run.dir={tmp / 'logps_run'}"), cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reference log-probs written to" in out.stdout
    return tmp, common


def test_sigterm_and_sigkill_resume_reproduce_the_loss_curve(toy):
    tmp, common = toy
    straight = tmp / "straight"
    out = subprocess.run(_cmd("train", "dpo", *common, f"run.dir={straight}"), cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    its, ref = _losses(straight)
    assert its == list(range(1, ITERS + 1))

    run = tmp / "interrupted"
    args = ["train", "dpo", *common, f"run.dir={run}", "checkpoint.save_interval=3",
            "checkpoint.keep_last=2"]
    code, seen, log = _run_until(args, run, 2, signal.SIGTERM)
    assert code == 75, log[-3000:]  # checkpoint saved, "preempted"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "preempted" and seen <= summary["iteration"] < ITERS
    stopped_at = summary["iteration"]
    assert (run / "checkpoints" / "latest").read_text() == f"iter_{stopped_at:07d}"

    code, seen, log = _run_until(args, run, stopped_at + 5, signal.SIGKILL)
    assert code == -signal.SIGKILL, log[-3000:]
    assert seen < ITERS, "the run finished before it could be killed"

    out = subprocess.run(_cmd(*args), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    its, losses = _losses(run)
    assert its == list(range(1, ITERS + 1))  # entries past the checkpoint were replaced
    assert losses == ref  # bit-identical to the uninterrupted run
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert len(kept) == 2 and kept[-1] == f"iter_{ITERS:07d}"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_stale_reference_logps_are_refused(toy):
    from avr_megatron.config import load_config
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.training.reference import ReferenceLogpsError, load_store

    tmp, common = toy
    overrides = [a for a in common[2:] if "=" in a]
    cfg = load_config(REPO / "recipes" / "tiny.yaml", overrides)
    td = load_training_data(cfg, "preference")
    chosen, rejected, stamp = load_store(cfg, td)
    assert len(chosen) == len(td.data) and stamp["reference"]["kind"] == "random"

    with pytest.raises(ReferenceLogpsError, match="this run's reference is random"):
        load_store(load_config(REPO / "recipes" / "tiny.yaml", overrides + ["run.seed=7"]), td)
    # the same pairs tokenised under another sequence length / over-length rule
    cut = load_config(REPO / "recipes" / "tiny.yaml", overrides + ["train.seq_length=96",
                                                                 "data.overlong=truncate"])
    with pytest.raises(ReferenceLogpsError, match=r"are stale: .* computed on different tokens"):
        load_store(cut, load_training_data(cut, "preference"))
    # an edited record and a new one
    records = preference_records(48, seed=2)
    records[3]["chosen"][0]["content"] = "best best best."
    records.append({**records[0], "id": "new-pair"})
    edited = write_jsonl(records, tmp / "edited" / "pairs.jsonl")
    cfg2 = load_config(REPO / "recipes" / "tiny.yaml", overrides + [
        f"data.train={edited}", f"logps.path={tmp / 'pairs.jsonl.ref_logps'}"])
    with pytest.raises(ReferenceLogpsError) as e:
        load_store(cfg2, load_training_data(cfg2, "preference"))
    msg = str(e.value)
    assert "1 training example(s) have none (e.g. 'new-pair')" in msg
    assert "1 were computed on different tokens (e.g. 'pair-3'" in msg
    assert "The data files changed" in msg and "avr logps" in msg
    missing = load_config(REPO / "recipes" / "tiny.yaml", overrides + [
        f"logps.path={tmp / 'nowhere'}"])
    with pytest.raises(ReferenceLogpsError, match="no reference log-probs at"):
        load_store(missing, td)
