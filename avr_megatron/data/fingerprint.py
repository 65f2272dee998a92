"""Content fingerprints of data files and checkpoint directories, to tell whether stored
results (reference log-probs) still belong to the inputs they were computed from.

Data files are hashed in full. Checkpoint directories can hold hundreds of GB, so large files
(> 4 MiB) contribute their name, size and the first and last MiB; small files (configs, indexes,
dist-checkpoint metadata) are hashed in full. Any re-save or edit changes the fingerprint;
Markdown files (model and dataset cards, which name paths and dates) do not count.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

_SMALL = 4 << 20
_EDGE = 1 << 20


def _update_file(h, path: Path, full: bool) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if full or size <= _SMALL:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))


def fingerprint_files(paths: Iterable[str | os.PathLike]) -> str:
    """Full-content hash of data files (names by basename, so moving a dataset keeps it)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode() + b"\0")
        _update_file(h, p, full=True)
    return h.hexdigest()[:16]


def fingerprint_dir(path: str | os.PathLike) -> str:
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # temporary/hidden files of writers
        if f.suffix == ".md":
            continue  # model and dataset cards describe the content (with paths), are not it
        h.update(str(rel).encode() + b"\0")
        _update_file(h, f, full=False)
    return h.hexdigest()[:16]
