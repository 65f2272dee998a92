"""Make packages unimportable in this process, to prove that a code path never needs them.

Each GPU role installs only what it needs (synth: vLLM, no Megatron-Core or Transformer Engine;
see the README). `block("megatron", "transformer_engine")` puts a finder first on
`sys.meta_path` that refuses those top-level packages (and their submodules) with an ImportError
naming the package, so a test that runs a command after it fails exactly where a role
environment would. Modules already imported stay usable: call it before importing anything.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Iterable


class BlockedImport(ModuleNotFoundError):
    """What a missing package raises (code that tolerates a missing package tolerates this)."""


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise BlockedImport(f"import of {fullname!r} is blocked in this process (a role environment "
                                f"without {fullname.partition('.')[0]!r})")
        return None


def block(*names: str) -> None:
    """Refuse every later import of the top-level packages `names`; ImportError if one is already
    imported (the check would prove nothing)."""
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in names)
    if loaded:
        raise ImportError(f"already imported, cannot block: {', '.join(loaded[:5])}")
    sys.meta_path.insert(0, _Blocker(names))
