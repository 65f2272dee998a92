"""A vLLM OpenAI-compatible server as a child process on 127.0.0.1, for tests and benchmarks:
started in its own session (so stopping it stops its engine processes too), waited for on
/health, stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], log: Path, port: int, timeout: float = 400.0) -> tuple[subprocess.Popen, str]:
    """Run `command` (a server listening on 127.0.0.1:`port`) until /health answers; returns the
    process and its root URL. The log's tail is in the error when it exits or times out."""
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not ready after {timeout}s:\n{log.read_text()[-4000:]}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
