"""Conversion output appears all at once or not at all.

Everything is written into a hidden sibling `.NAME.tmp-PID` and renamed to NAME only after the
last byte is on disk; any exception (or Ctrl-C) removes the temporary directory. A process killed
outright leaves only the hidden temporary directory, never something at the target path.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from avr_megatron.conversion.errors import ConversionError


def check_target(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out}: already exists; remove it or choose another output path")


@contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    out = Path(out)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_target(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
