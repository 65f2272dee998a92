"""Streaming access to safetensors files, without memory-mapping whole shards.

Reading: the header is parsed and checked against the file size (a truncated or corrupt shard is
reported with its path before anything is converted), then any row range of a tensor is read with
one `readinto` into a fresh tensor, so resident memory holds only the rows asked for (an mmap
would keep every touched page of the shard resident). Writing: the header is computed from the
(name, dtype, shape) list up front, then tensors are appended piece by piece, so a shard is never
assembled in memory. Both follow the format spec: 8-byte little-endian header length, JSON
header (padded with spaces to 8 bytes), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from avr_megatron.conversion.errors import ConversionError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (one element for 1-D tensors)."""
        return math.prod(self.shape[1:]) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """One .safetensors file: validated header, row-range reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._parse()
        self._file = None

    def _fail(self, why: str) -> ConversionError:
        return ConversionError(f"{self.path}: corrupt or truncated safetensors file: {why}")

    def _parse(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._fail(f"file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise self._fail(f"header length {n} does not fit in a file of {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        start = 8 + n
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                b, e = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise self._fail(f"tensor {name!r}: bad header entry {entry!r} ({err!r})") from None
            nbytes = math.prod(shape) * _itemsize(dtype)
            if any(s < 0 for s in shape) or b < 0 or e - b != nbytes:
                raise self._fail(f"tensor {name!r}: data_offsets {[b, e]} do not hold "
                                 f"{entry['dtype']} {list(shape)} ({nbytes} bytes)")
            if start + e > size:
                raise self._fail(f"tensor {name!r} ends at byte {start + e} but the file has only "
                                 f"{size} bytes")
            self.tensors[name] = TensorInfo(dtype, shape, start + b, start + e)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its rows [a, b) along dim 0 (elements for 1-D tensors)."""
        info = self.tensors[name]
        a, b = (0, info.shape[0] if info.shape else 1) if rows is None else rows
        shape = (b - a, *info.shape[1:]) if info.shape else ()
        nbytes = (b - a) * info.row_bytes if info.shape else info.end - info.begin
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        self._file.seek(info.begin + a * info.row_bytes)
        view = memoryview(buf.numpy())
        got = 0
        while got < nbytes:  # readinto may return short counts
            n = self._file.readinto(view[got:])
            if not n:
                raise self._fail(f"tensor {name!r}: file ended after {got} of {nbytes} bytes")
            got += n
        return buf.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def header_bytes(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """(8-byte length + padded JSON header, data size) for tensors laid out in the given order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor (each possibly in several row pieces), in the
    order given at construction. `close()` checks that every byte promised by the header came."""

    def __init__(self, path: str | os.PathLike,
                 specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        head, self._size = header_bytes(self.specs, metadata)
        self._file = open(self.path, "wb")
        self._file.write(head)
        self._index = 0
        self._written = 0  # bytes of the current tensor

    @property
    def complete(self) -> bool:
        return self._index == len(self.specs)

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (which must be the current one)."""
        if self._index >= len(self.specs):
            raise ConversionError(f"{self.path}: unexpected tensor {name!r} after the last one")
        spec_name, dtype, shape = self.specs[self._index]
        if name != spec_name:
            raise ConversionError(f"{self.path}: expected tensor {spec_name!r} next, got {name!r}")
        if piece.dtype != dtype or tuple(piece.shape[1:]) != tuple(shape[1:]):
            raise ConversionError(f"{self.path}: {name}: piece {piece.dtype} "
                                  f"{tuple(piece.shape)} does not fit {dtype} {shape}")
        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += data.nbytes
        total = math.prod(shape) * _itemsize(dtype)
        if self._written > total:
            raise ConversionError(f"{self.path}: {name}: more data than its shape {shape} holds")
        if self._written == total:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        if self._index != len(self.specs):
            missing = self.specs[self._index][0]
            self._file.close()
            raise ConversionError(f"{self.path}: closed before tensor {missing!r} was complete")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
