"""The weights of a Hugging Face model directory, read tensor by tensor (row ranges on demand).

Accepts `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and the
legacy `pytorch_model.bin` (+ index), which is opened with `torch.load(weights_only=True,
mmap=True)`: no pickled code runs and tensors are paged in lazily. Every shard's header is
validated when the directory is opened, so a corrupt or truncated shard fails before any output
is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.safetensors_io import SafetensorsFile

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class WeightInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str


class _BinFile:
    """A torch.save'd state dict, loaded safely and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle errors, zip errors, unsafe globals
            raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {e}") \
                from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConversionError(f"{path}: not a state dict of tensors")
        self._sd = sd
        self.tensors = {k: v for k, v in sd.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._sd[name]
        return (t if rows is None else t[rows[0]:rows[1]]).clone()

    def close(self) -> None:
        self._sd = {}


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a valid weight index ({e!r})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path}: weight_map is empty or not an object")
    return weight_map


class HFWeights:
    """Name -> (dtype, shape) for every tensor of an HF model directory, and reads."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._files: dict[str, SafetensorsFile | _BinFile] = {}
        self.info: dict[str, WeightInfo] = {}
        if (self.dir / SAFE_INDEX).is_file():
            self._open_sharded(SAFE_INDEX, SafetensorsFile)
        elif (self.dir / SAFE_SINGLE).is_file():
            self._open_files([SAFE_SINGLE], SafetensorsFile)
        elif (self.dir / BIN_INDEX).is_file():
            self._open_sharded(BIN_INDEX, _BinFile)
        elif (self.dir / BIN_SINGLE).is_file():
            self._open_files([BIN_SINGLE], _BinFile)
        else:
            raise ConversionError(f"{self.dir}: no model weights found (expected {SAFE_SINGLE}, "
                                  f"{SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _open_files(self, names: list[str], kind) -> None:
        for fname in names:
            path = self.dir / fname
            if not path.is_file():
                raise ConversionError(f"{path}: shard named in the weight index does not exist")
            f = self._files[fname] = kind(path)
            for name, t in f.tensors.items():
                if name in self.info:
                    raise ConversionError(f"tensor {name!r} appears in both "
                                          f"{self.info[name].file} and {fname}")
                self.info[name] = WeightInfo(t.dtype, tuple(t.shape), fname)

    def _open_sharded(self, index_name: str, kind) -> None:
        weight_map = _read_index(self.dir / index_name)
        self._open_files(sorted(set(weight_map.values())), kind)
        for name, fname in weight_map.items():
            where = self.info.get(name)
            if where is None or where.file != fname:
                raise ConversionError(
                    f"{self.dir / index_name}: maps {name!r} to {fname}, but that shard does not "
                    f"hold it" + (f" (found in {where.file})" if where else ""))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._files[self.info[name].file].read(name, rows)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
