"""Hugging Face Llama directory -> avr-megatron checkpoint (Megatron torch_dist), streaming.

    <out>/latest                  "iter_0000000"
    <out>/iter_0000000/           torch_dist data + metadata.json (Megatron's own files)
                                  avr_checkpoint.json, config.yaml (the model as a recipe)
                                  hf/ (tokenizer, chat template, original config.json, ...)

Everything is checked before the first byte is written: the HF config (architecture, fields,
TP/PP divisibility), every shard header, and the exact set and shapes of tensors. The data is
then produced one chunk at a time straight from HF row reads (see dist_io), so memory stays at
one chunk whatever the model size; the output directory appears only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from avr_megatron.checkpoint.dist_ckpt import (
    CONFIG_FILE,
    HF_ASSETS_DIR,
    META_FILE,
    checkpoint_meta,
    iter_dir_name,
    write_latest,
)
from avr_megatron.config import AvrConfig, save_config
from avr_megatron.config.hf_model import model_config_from_hf, read_hf_config
from avr_megatron.config.schema import ModelConfig
from avr_megatron.conversion import dist_io
from avr_megatron.conversion.assets import copy_assets, has_tokenizer
from avr_megatron.conversion.atomic import atomic_output, check_target
from avr_megatron.conversion.errors import ConversionError
from avr_megatron.conversion.hf_config import DTYPE_NAMES, avr_config_for, check_layout, hf_dtype
from avr_megatron.conversion.hf_weights import HFWeights
from avr_megatron.conversion.mapping import (
    IGNORED_HF,
    TIED_HF_COPY,
    ModelTensor,
    expected_hf,
    model_tensors,
)

log = logging.getLogger(__name__)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weights(weights: HFWeights, m: ModelConfig) -> None:
    """Exactly the tensors of `m`, with their shapes and float dtypes; errors name them all."""
    expected = expected_hf(m)
    present = {n: i for n, i in weights.info.items() if not n.endswith(IGNORED_HF)}
    if m.tie_word_embeddings:
        present.pop(TIED_HF_COPY, None)
    where = weights.dir
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors (not part of a {m.num_layers}-layer Llama): "
                        f"{', '.join(extra)}")
    for name in sorted(set(expected) & set(present)):
        got = present[name]
        if got.shape != expected[name]:
            problems.append(f"{name} in {got.file}: shape {list(got.shape)}, expected "
                            f"{list(expected[name])}")
        elif got.dtype not in _FLOAT:
            problems.append(f"{name} in {got.file}: dtype {got.dtype} is not a float type "
                            "(quantized weights are not supported)")
    if problems:
        raise ConversionError(f"{where}: the weights do not match config.json:\n  - "
                              + "\n  - ".join(problems))


def _chunk_maker(weights: HFWeights, dtype: torch.dtype):
    def make(c: dist_io.Chunk) -> torch.Tensor:
        t: ModelTensor = c.tensor
        a, b = c.offsets[0], c.offsets[0] + c.sizes[0]
        data = t.merge_rows(lambda name, lo, hi: weights.read(name, (lo, hi)), a, b, dtype)
        for dim in range(1, data.dim()):
            if c.sizes[dim] != data.shape[dim]:
                data = data.narrow(dim, c.offsets[dim], c.sizes[dim])
        return data.contiguous()
    return make


def convert_hf_to_mcore(hf_dir: str | Path, out: str | Path, *, base: AvrConfig | None = None,
                        tp: int | None = None, pp: int | None = None, dtype: str | None = None,
                        max_chunk_bytes: int = dist_io.DEFAULT_MAX_CHUNK_BYTES,
                        progress: bool = True) -> Path:
    """Convert; returns the checkpoint root `out`. `base` is the recipe whose non-model sections
    (and model keys HF does not describe) are stored with the checkpoint; `tp`/`pp` default to
    its parallel section and set the chunking the checkpoint is written in (it loads under any
    layout); `dtype` (bf16|fp16|fp32) defaults to the HF config's dtype."""
    from tqdm import tqdm

    from avr_megatron.config import load_config

    hf_dir, out = Path(hf_dir), Path(out)
    check_target(out)
    start = time.time()
    base = base if base is not None else load_config(None)
    tp = base.parallel.tensor_model_parallel_size if tp is None else tp
    pp = base.parallel.pipeline_model_parallel_size if pp is None else pp
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    m = model_config_from_hf(hf, base.model, where)
    check_layout(m, tp, pp, where)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    torch_dtype = DTYPE_NAMES[dtype] if dtype else (hf_dtype(hf) or torch.float32)
    cfg = avr_config_for(m, base, tp, pp, torch_dtype, where)
    weights = HFWeights(hf_dir)
    if not has_tokenizer(hf_dir):
        log.warning("%s has no tokenizer files: exporting this checkpoint back to HF will need "
                    "--tokenizer", hf_dir)
    try:
        check_weights(weights, m)
        tensors = model_tensors(m)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        total = sum(math.prod(t.shape) for t in tensors)
        log.info("converting %s -> %s: %d layers, %.2f GB as %s, chunked for TP=%d",
                 hf_dir, out, m.num_layers, total * itemsize / 1e9, torch_dtype, tp)
        with atomic_output(out) as tmp, tqdm(total=total * itemsize, unit="B", unit_scale=True,
                                             desc="hf-to-mcore", disable=not progress or None,
                                             mininterval=1.0) as bar:
            ckpt = tmp / iter_dir_name(0)
            dist_io.write_checkpoint(ckpt, m, tensors, tp, torch_dtype,
                                     _chunk_maker(weights, torch_dtype),
                                     max_chunk_bytes=max_chunk_bytes, progress=bar.update)
            (ckpt / "metadata.json").write_text(json.dumps(dist_io.MEGATRON_CONFIG))
            save_config(cfg, ckpt / CONFIG_FILE)
            copy_assets(hf_dir, ckpt / HF_ASSETS_DIR)
            meta = checkpoint_meta(0, cfg, has_optimizer=False, num_chunks=1,
                                   converted_from={"hf_dir": str(hf_dir.resolve()),
                                                   "dtype": str(torch_dtype)})
            (ckpt / META_FILE).write_text(json.dumps(meta, indent=2))
            write_latest(tmp, ckpt.name)
    finally:
        weights.close()
    log.info("wrote %s in %.1f s", out, time.time() - start)
    return out
