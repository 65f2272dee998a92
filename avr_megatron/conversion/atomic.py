"""Conversion output appears all at once or not at all.

Everything is written into a hidden sibling `.NAME.tmp-HOST-PID` and renamed to NAME only after
the last byte is on disk; any exception (or Ctrl-C) removes the temporary directory. A process
killed outright (kill -9, OOM) leaves only the hidden temporary directory, never something at the
target path, and the next conversion into the same parent directory removes such leftovers of
dead processes (a 70B one is ~140 GB) before it starts.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from avr_megatron.conversion.errors import ConversionError
from avr_megatron.runtime import files

log = logging.getLogger(__name__)
# `.NAME.tmp-<host>-<pid>` (and `.NAME.tmp-<pid>` of older versions).
_TEMP_DIR = r"^\..+\.tmp-(?P<owner>[^.]+-\d+|\d+)$"


def check_target(out: Path) -> None:
    if out.exists():
        raise ConversionError(f"{out}: already exists; remove it or choose another output path")


@contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    out = Path(out)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in files.remove_stale(out.parent, _TEMP_DIR):
        log.warning("removed %s: a temporary directory left by a conversion that was killed",
                    stale)
    tmp = files.temp_dir_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_target(out)
        files.publish_dir(tmp, out)
    except BaseException as e:
        # Disk full / read-only: diagnosed before the partial output is removed (freeing space).
        error = files.storage_error(
            tmp, e, kept=f"nothing at {out} (a conversion writes all or nothing; the partial "
                         "output was removed) and the input is untouched"
        ) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from e
        raise
