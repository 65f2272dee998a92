"""The non-weight files of a Hugging Face model directory: tokenizer, chat template, configs,
license. They travel with a converted checkpoint (in its `hf/` folder) and back out to HF.

Top-level regular files are copied except weights and Python code (`trust_remote_code` is never
used, so code would be dead weight at best); subfolders (e.g. Meta's `original/` consolidated
weights) are skipped.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".npz", ".index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                    "tiktoken.model")


def asset_files(src: Path) -> list[Path]:
    out = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.suffix == ".py":
            log.warning("not copying %s: remote code is never trusted or run", path)
            continue
        out.append(path)
    return out


def copy_assets(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for path in asset_files(src):
        if path.name not in exclude:
            shutil.copy2(path, dst / path.name)
            names.append(path.name)
    return names


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)
