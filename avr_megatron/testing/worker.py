"""Entry point of one rank for `run_distributed`: import the function's file, call it, pickle
(ok, result-or-traceback) to <work>/rank<R>.pkl, and tear the process groups down."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import traceback
from pathlib import Path


def main() -> int:
    source, name, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    kwargs = pickle.loads((work / "kwargs.pkl").read_bytes())
    ok, value = True, None
    try:
        spec = importlib.util.spec_from_file_location(f"_avr_dist_{Path(source).stem}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        value = getattr(module, name)(**kwargs)
    except BaseException:  # report everything, including SystemExit from asserts in libraries
        ok, value = False, traceback.format_exc()
    try:
        payload = pickle.dumps((ok, value))
    except Exception:
        ok, payload = False, pickle.dumps((False, "result is not picklable:\n"
                                           + traceback.format_exc()))
    from avr_megatron.runtime.files import atomic_write_bytes

    atomic_write_bytes(work / f"rank{rank}.pkl", payload)
    try:
        from avr_megatron.runtime.distributed import shutdown

        shutdown()
    except Exception:
        pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
