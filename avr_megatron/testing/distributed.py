"""Run a function on N ranks under `torchrun` and report each rank's failure clearly.

    results = run_distributed(_check_tp, nproc=2, tmp=str(tmp_path))

`fn` must be a module-level function of an importable file (a test module is fine); it runs in
fresh processes via `avr_megatron.testing.worker`, with keyword arguments and return values passed
by pickle. Any rank's exception fails the call with every rank's traceback and the output tail.
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

_REPO_ROOT = Path(__file__).resolve().parents[2]


class DistributedTestError(AssertionError):
    pass


def run_distributed(fn: Callable, nproc: int = 2, timeout: float = 600, env: dict | None = None,
                    **kwargs: Any) -> list[Any]:
    """Run `fn(**kwargs)` on `nproc` ranks; return each rank's return value, in rank order."""
    source = inspect.getsourcefile(fn)
    with tempfile.TemporaryDirectory(prefix="avr-dist-") as work:
        work_dir = Path(work)
        (work_dir / "kwargs.pkl").write_bytes(pickle.dumps(kwargs))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "avr_megatron.testing.worker",
               source, fn.__name__, str(work_dir)]
        run_env = dict(os.environ)
        run_env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                        "PYTHONPATH": os.pathsep.join(
                            [str(_REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                        "TORCHELASTIC_ERROR_FILE": str(work_dir / "elastic_error.json")})
        run_env.update(env or {})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=run_env, cwd=os.getcwd())
            output, returncode = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            output += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
                else (e.stderr or "")
            returncode = f"timeout after {timeout:.0f}s"
        results, failures = [], []
        for rank in range(nproc):
            path = work_dir / f"rank{rank}.pkl"
            if not path.exists():
                failures.append(f"--- rank {rank}: no result (crashed, killed or hung)")
                results.append(None)
                continue
            ok, value = pickle.loads(path.read_bytes())
            if ok:
                results.append(value)
            else:
                failures.append(f"--- rank {rank} raised:\n{value}")
                results.append(None)
        if failures or returncode != 0:
            tail = "\n".join(output.splitlines()[-60:])
            raise DistributedTestError(
                f"{fn.__name__} on {nproc} ranks failed (exit {returncode}).\n"
                + "\n".join(failures) + f"\n--- output tail:\n{tail}")
        return results


def save_initial_weights(overrides: list[str], path: str | Path) -> str:
    """On every rank of a `run_distributed` function: set up the process groups of the config that
    `overrides` give, wait for all ranks (rank 0 may have written the tokenizer and data first),
    seed, build the model and save its initial weights at `path` (iteration 0), so that runs under
    other layouts start from the same weights. Returns the override that loads them."""
    import torch.distributed as dist

    from avr_megatron.checkpoint.dist_ckpt import save_checkpoint
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import initialize, seed_everything

    cfg = load_config(None, overrides)
    initialize(cfg)
    dist.barrier()
    seed_everything(cfg.run.seed)
    save_checkpoint(Path(path), 0, build_model(cfg), cfg)
    return f"model.init_from.mcore={path}"
