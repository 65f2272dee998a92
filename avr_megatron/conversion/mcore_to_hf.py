"""avr-megatron checkpoint (any TP/PP, with or without optimizer state) -> Hugging Face directory.

Writes config.json, generation_config.json, the tokenizer files and chat template (from the
checkpoint's `hf/` folder or `--tokenizer`), and safetensors shards (with
model.safetensors.index.json when there is more than one, as transformers does). Only model
tensors are read, one layer (or one stored chunk of the embeddings) at a time, and written
straight into the shard files; the output directory appears only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from avr_megatron.checkpoint.dist_ckpt import CheckpointError, hf_assets, read_config, resolve
from avr_megatron.config.schema import ModelConfig
from avr_megatron.conversion.assets import copy_assets, has_tokenizer
from avr_megatron.conversion.atomic import atomic_output, check_target
from avr_megatron.conversion.dist_io import DistReader, global_shape, storage_key
from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.hf_config import (
    DTYPE_NAMES,
    generation_config,
    hf_config_from_model,
)
from avr_megatron.conversion.mapping import ModelTensor, model_tensors
from avr_megatron.conversion.model_card import write_model_card
from avr_megatron.conversion.safetensors_io import SafetensorsWriter

log = logging.getLogger(__name__)
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
SAFE_INDEX = "model.safetensors.index.json"


def check_checkpoint(reader: DistReader, m: ModelConfig, tensors: list[ModelTensor]) -> None:
    """Every model tensor present with the shape the config implies; no unknown model tensors.
    Optimizer state and `_extra_state` objects are ignored."""
    expected = {storage_key(t): global_shape(t, m.num_layers) for t in tensors}
    problems = []
    for key, shape in expected.items():
        md = reader.tensors.get(key)
        if md is None:
            problems.append(f"missing tensor {key}")
        elif tuple(md.size) != shape:
            problems.append(f"{key}: shape {list(md.size)}, expected {list(shape)} from the "
                            "checkpoint's config.yaml")
    extra = sorted(k for k in reader.tensors if k.startswith(_MODEL_PREFIXES) and k not in expected)
    if extra:
        problems.append(f"unexpected model tensors: {', '.join(extra)}")
    if problems:
        raise ConversionError(f"{reader.path}: the checkpoint does not match its config:\n  - "
                              + "\n  - ".join(problems))


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Consecutive groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for spec in specs:
        n = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


class _ShardedWriter:
    """Writes tensors in planned order across shard files, opening each when reached."""

    def __init__(self, folder: Path, shards: list[list], metadata: dict):
        self.folder, self.shards, self.metadata = folder, shards, metadata
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard, self._writer = -1, None

    def write(self, name: str, piece: torch.Tensor) -> None:
        if self._writer is None or self._writer.complete:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = SafetensorsWriter(self.folder / self.names[self._shard],
                                             self.shards[self._shard], self.metadata)
        self._writer.write(name, piece)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self.shards) - 1:
            raise ConversionError(f"{self.folder}: only {self._shard + 1} of {len(self.shards)} "
                                  "shards were written")

    def weight_map(self) -> dict[str, str]:
        return {name: file for file, shard in zip(self.names, self.shards) for name, _, _ in shard}


def _stream_tensors(reader: DistReader, tensors: list[ModelTensor], dtype: torch.dtype):
    """(HF name, rows piece) in file order: each layer's tensors read in one go, the
    non-layer tensors (embeddings, output layer) one stored row block at a time."""
    by_layer: dict[int | None, list[ModelTensor]] = defaultdict(list)
    for t in tensors:
        by_layer[t.layer].append(t)
    done_layers = set()
    for t in tensors:
        if t.layer is None:
            key = storage_key(t)
            for a, b in reader.row_blocks(key):
                (block,) = reader.read([(key, (a, *[0] * (len(t.shape) - 1)),
                                         (b - a, *t.shape[1:]))])
                for name, _, piece in t.split_rows(block, start=a):
                    yield name, piece.to(dtype)
            continue
        if t.layer in done_layers:
            continue
        done_layers.add(t.layer)
        group = by_layer[t.layer]
        data = reader.read([(storage_key(u), (u.layer, *[0] * len(u.shape)), (1, *u.shape))
                            for u in group])
        for u, full in zip(group, data):
            pieces = defaultdict(list)
            for name, first, piece in u.split_rows(full[0]):
                pieces[name].append((first, piece))
            for name in u.hf_names:
                for _, piece in sorted(pieces[name], key=lambda p: p[0]):
                    yield name, piece.to(dtype)
        del data


def _token_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def convert_mcore_to_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                        tokenizer: str | Path | None = None, max_shard_bytes: int = 5 * 10**9,
                        progress: bool = True) -> Path:
    """Convert; returns `out`. `tokenizer`: a folder with tokenizer files (an HF model
    directory works) for checkpoints that carry none (e.g. trained from scratch)."""
    from tqdm import tqdm

    out = Path(out)
    check_target(out)
    start = time.time()
    try:
        ckpt_dir = resolve(ckpt)
        cfg = read_config(ckpt_dir)
        assets = Path(tokenizer) if tokenizer else hf_assets(ckpt_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    m = cfg.model
    if assets is None:
        raise ConversionError(f"{ckpt_dir}: the checkpoint carries no tokenizer (no hf/ folder: "
                              "it was not converted from Hugging Face); pass --tokenizer DIR")
    if not assets.is_dir() or not has_tokenizer(assets):
        raise ConversionError(f"{assets}: no tokenizer files (tokenizer.json, tokenizer.model "
                              "or tokenizer_config.json)")
    reader = DistReader(ckpt_dir)
    tensors = model_tensors(m)
    check_checkpoint(reader, m, tensors)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    stored = reader.tensors[storage_key(tensors[0])].properties.dtype
    out_dtype = DTYPE_NAMES[dtype] if dtype else stored

    base = None
    if (assets / "config.json").is_file():
        base = json.loads((assets / "config.json").read_text())
    hf_config = hf_config_from_model(m, out_dtype, base,
                                     None if base else _token_ids(assets))
    specs = [(name, out_dtype, shape) for t in tensors
             for name, shape in zip(t.hf_names, t.hf_shapes)]
    total = sum(math.prod(s) for _, _, s in specs) * torch.empty((), dtype=out_dtype).element_size()
    log.info("exporting %s -> %s: %d layers, %.2f GB as %s", ckpt_dir, out, m.num_layers,
             total / 1e9, out_dtype)
    with atomic_output(out) as tmp, tqdm(total=total, unit="B", unit_scale=True,
                                         desc="mcore-to-hf", disable=not progress or None,
                                         mininterval=1.0) as bar:
        shards = plan_shards(specs, max_shard_bytes)
        writer = _ShardedWriter(tmp, shards, {"format": "pt"})
        for name, piece in _stream_tensors(reader, tensors, out_dtype):
            writer.write(name, piece)
            bar.update(piece.numel() * piece.element_size())
        writer.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": writer.weight_map()}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2))
        copy_assets(assets, tmp, exclude=("config.json", "README.md"))
        write_model_card(tmp, ckpt_dir, assets)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if not (tmp / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_text(
                json.dumps(generation_config(hf_config), indent=2) + "\n")
    log.info("wrote %s in %.1f s", out, time.time() - start)
    return out
