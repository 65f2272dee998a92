"""<run.dir>/pipeline.json: what each stage read and wrote, with fingerprints and timings.

A stage is skipped on a rerun when its last run finished and its config and the fingerprints of
everything it reads are unchanged, and its outputs still exist. Fingerprints are content hashes
(avr_megatron.data.fingerprint: data in full, large checkpoint files by size and edges), so a
stage whose upstream was rerun to identical results stays skipped. Written atomically after
every change of state, so a kill never leaves a half-written manifest.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from avr_megatron.runtime.files import atomic_write_json


def fingerprint(path: Path) -> str | None:
    """Content fingerprint of a file or directory; None when it does not exist."""
    from avr_megatron.data.fingerprint import fingerprint_dir, fingerprint_files

    if path.is_dir():
        return fingerprint_dir(path)
    if path.is_file():
        return fingerprint_files([path])
    return None


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            self.data = json.loads(path.read_text())

    def entry(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].get(stage, {})

    def is_current(self, stage: str, config_fp: str, inputs: dict[str, str | None],
                   outputs: list[Path]) -> tuple[bool, str]:
        """(skip?, reason)."""
        e = self.entry(stage)
        if e.get("status") != "done":
            return False, f"last status {e.get('status', 'never run')}"
        if e.get("config_fingerprint") != config_fp:
            return False, "its config changed"
        changed = [p for p, fp in inputs.items() if e.get("inputs", {}).get(p) != fp]
        if changed:
            return False, f"inputs changed: {', '.join(changed)}"
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            return False, f"outputs missing: {', '.join(missing)}"
        return True, "up to date"

    def start(self, stage: str, config_fp: str, inputs: dict[str, str | None]) -> None:
        self.data["stages"][stage] = {"status": "running", "started": time.time(),
                                      "config_fingerprint": config_fp, "inputs": inputs}
        self.save()

    def finish(self, stage: str, status: str, outputs: dict[str, str | None] | None = None,
               summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        e = self.data["stages"].setdefault(stage, {})
        e.update(status=status, ended=time.time())
        e["seconds"] = round(e["ended"] - e.get("started", e["ended"]), 1)
        if outputs is not None:
            e["outputs"] = outputs
        if summary is not None:
            e["summary"] = summary
        if error is not None:
            e["error"] = error[-4000:]
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)
