"""Our streaming safetensors reader/writer against the safetensors library."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.safetensors_io import SafetensorsFile, SafetensorsWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
            "c": torch.randn(4, 2, 3, generator=g).half()}


def test_row_reads_match_library(tmp_path):
    ref = _tensors()
    save_file(ref, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"}
    for name, t in ref.items():
        assert torch.equal(f.read(name), t)
        assert torch.equal(f.read(name, (1, 3)), t[1:3])
    f.close()


def test_streamed_write_is_read_by_library(tmp_path):
    ref = _tensors()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in ref.items()]
    w = SafetensorsWriter(tmp_path / "y.safetensors", specs, {"format": "pt"})
    w.write("a", ref["a"][:2])
    w.write("a", ref["a"][2:])
    w.write("b", ref["b"])
    with pytest.raises(ConversionError, match="expected tensor 'c' next"):
        w.write("a", ref["a"])
    w.write("c", ref["c"])
    w.close()
    with safe_open(tmp_path / "y.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in ref.items():
            assert torch.equal(f.get_tensor(name), t)


def test_incomplete_write_is_an_error(tmp_path):
    w = SafetensorsWriter(tmp_path / "z.safetensors", [("a", torch.float32, (4, 2))])
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(ConversionError, match="before tensor 'a' was complete"):
        w.close()


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_file(_tensors(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ConversionError, match=r"cut.safetensors: corrupt or truncated.*ends at"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(ConversionError, match="fewer than the 8-byte header"):
        SafetensorsFile(tmp_path / "short.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    (tmp_path / "garbage.safetensors").write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(ConversionError, match="not valid JSON"):
        SafetensorsFile(tmp_path / "garbage.safetensors")
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [8, 5]  # offsets no longer hold the shape
    raw = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ConversionError, match="tensor 'a': data_offsets"):
        SafetensorsFile(tmp_path / "bad.safetensors")
