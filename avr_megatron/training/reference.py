"""Reference-model log-probs for preference losses: computed once and stored (`avr logps`), or
computed online each step by a frozen copy of the reference model.

Stored log-probs live in a directory next to the data (default `<data.train>.ref_logps/`):

    logps.parquet   id, chosen, rejected (sums of trained-token log-probs), chosen_tokens,
                    rejected_tokens, example_hash (hash of the exact token ids and masks)
    stamp.json      the reference checkpoint's fingerprint, the tokenizer's, the data files',
                    the tokenisation settings, precision and the layout used

Training refuses a store whose reference or tokenizer differs from its own, or that lacks an
example or saw different tokens for it (edited data, another over-length rule or sequence
length): each case is a clear error saying what differs and how to recompute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.schema import InitFromConfig
from avr_megatron.data.batches import PackedBatch
from avr_megatron.data.dataset import TrainingData
from avr_megatron.data.fingerprint import fingerprint_dir
from avr_megatron.runtime.device import device
from avr_megatron.runtime.files import STALE_FILE, atomic_file, atomic_write_text, remove_stale

log = logging.getLogger(__name__)
FORMAT = "avr-megatron/ref-logps/1"
STAMP, TABLE, PARTS = "stamp.json", "logps.parquet", ".parts"


class ReferenceLogpsError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Which reference model, and where its log-probs are stored

def reference_source(cfg: AvrConfig) -> InitFromConfig:
    ref = cfg.logps.reference
    return ref if (ref.hf or ref.mcore) else cfg.model.init_from


def _model_shape_hash(cfg: AvrConfig) -> str:
    shape = {k: v for k, v in asdict(cfg.model).items()
             if k not in ("init_from", "preset", "transformer_impl", "recompute_granularity",
                          "recompute_method", "recompute_num_layers")}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def reference_identity(cfg: AvrConfig) -> dict:
    """What the reference model is, in a form that survives moving files: a content
    fingerprint of its checkpoint (or, for a random init, the seed and model shape)."""
    src = reference_source(cfg)
    if src.hf:
        return {"kind": "hf", "path": str(Path(src.hf).resolve()),
                "fingerprint": fingerprint_dir(src.hf)}
    if src.mcore:
        from avr_megatron.checkpoint.dist_ckpt import read_meta, resolve

        ckpt = resolve(src.mcore)
        return {"kind": "mcore", "path": str(ckpt.resolve()),
                "iteration": read_meta(ckpt)["iteration"], "fingerprint": fingerprint_dir(ckpt)}
    return {"kind": "random", "seed": cfg.run.seed,
            "fingerprint": f"seed{cfg.run.seed}-{_model_shape_hash(cfg)}"}


def _split(td) -> str:
    return getattr(td, "split", "train")  # data.train unless the data says data.valid


def store_path(cfg: AvrConfig, split: str = "train") -> Path:
    """Where the reference log-probs of data.<split> (train or valid) live."""
    key = "logps.path" if split == "train" else "logps.valid_path"
    explicit = cfg.logps.path if split == "train" else cfg.logps.valid_path
    if explicit:
        return Path(explicit)
    data = getattr(cfg.data, split)
    if data is None:
        raise ConfigError(f"{key} is not set and there is no data.{split} to put it next to")
    if any(ch in data for ch in "*?["):
        raise ConfigError(f"data.{split}={data!r} is a glob: set {key} to say where the "
                          "reference log-probs live")
    path = Path(data.rstrip("/"))
    return path.with_name(path.name + ".ref_logps")


def reference_config(cfg: AvrConfig) -> AvrConfig:
    """The config the reference model is built with: the run's, without FP8 unless logps.fp8
    asks for it (bf16/fp32 per precision.bf16)."""
    if cfg.precision.fp8 is None or cfg.logps.fp8:
        return cfg
    return replace(cfg, precision=replace(cfg.precision, fp8=None, fp8_param=False))


def reference_precision(cfg: AvrConfig) -> str:
    """The numeric format reference log-probs are computed in, as recorded in the stamp."""
    pr = reference_config(cfg).precision
    base = "bf16" if pr.bf16 else "fp32"
    return base if pr.fp8 is None else f"{base}+fp8-{pr.fp8}-{pr.fp8_recipe}"


def make_stamp(cfg: AvrConfig, td: TrainingData, layout) -> dict:
    return {
        "format": FORMAT,
        "reference": reference_identity(cfg),
        "tokenizer_fingerprint": td.tokenizer_fingerprint,
        "data": {_split(td): str(getattr(cfg.data, _split(td))),
                 "files_fingerprint": td.files_fingerprint,
                 "examples_fingerprint": td.data.fingerprint(), "examples": len(td.data)},
        "tokenisation": {"seq_length": cfg.train.seq_length, "overlong": cfg.data.overlong},
        "precision": reference_precision(cfg),
        "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
    }


# --------------------------------------------------------------------------------------------
# Reading a store for training

def load_store(cfg: AvrConfig, td: TrainingData) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ref chosen [units], ref rejected [units], stamp) aligned with td's units, after checking
    that the store belongs to this reference, tokenizer and data."""
    path = store_path(cfg, _split(td))
    recompute = (f"recompute them with `avr logps` and the same recipe (it writes {path}), or "
                 "set loss.reference=online")
    if not (path / STAMP).is_file():
        if (path / PARTS).is_dir():
            raise ReferenceLogpsError(f"reference log-probs at {path} are incomplete (an "
                                      f"`avr logps` run did not finish): rerun it to resume")
        raise ReferenceLogpsError(f"loss.reference=precomputed but there are no reference "
                                  f"log-probs at {path}: {recompute}")
    stamp = json.loads((path / STAMP).read_text())
    if stamp.get("format") != FORMAT:
        raise ReferenceLogpsError(f"{path / STAMP}: unknown format {stamp.get('format')!r}")
    mine = reference_identity(cfg)
    theirs = stamp["reference"]
    if theirs["fingerprint"] != mine["fingerprint"]:
        raise ReferenceLogpsError(
            f"reference log-probs at {path} were computed with reference {theirs.get('kind')} "
            f"{theirs.get('path', theirs.get('seed'))} (fingerprint {theirs['fingerprint']}), but "
            f"this run's reference is {mine['kind']} {mine.get('path', mine.get('seed'))} "
            f"(fingerprint {mine['fingerprint']}; logps.reference, else model.init_from): "
            f"{recompute}")
    if stamp["tokenizer_fingerprint"] != td.tokenizer_fingerprint:
        raise ReferenceLogpsError(
            f"reference log-probs at {path} were computed with another tokenizer or chat "
            f"template (fingerprint {stamp['tokenizer_fingerprint']}, this run: "
            f"{td.tokenizer_fingerprint}): {recompute}")
    mine_precision = reference_precision(cfg)
    if stamp.get("precision") != mine_precision:
        log.warning("reference log-probs at %s were computed in %s; this run's reference "
                    "precision is %s (precision.*, logps.fp8)", path, stamp.get("precision"),
                    mine_precision)
    import pyarrow.parquet as pq

    table = pq.read_table(path / TABLE).to_pydict()
    row = {rid: i for i, rid in enumerate(table["id"])}
    n = len(td.data)
    chosen, rejected = np.empty(n, np.float64), np.empty(n, np.float64)
    missing, changed = [], []
    for u, rid in enumerate(td.data.ids):
        i = row.get(rid)
        if i is None:
            missing.append(rid)
            continue
        if table["example_hash"][i] != td.data.example_hash(u):
            changed.append(rid)
            continue
        chosen[u], rejected[u] = table["chosen"][i], table["rejected"][i]
    if missing or changed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} training example(s) have none (e.g. "
                         f"{', '.join(map(repr, missing[:3]))})")
        if changed:
            parts.append(f"{len(changed)} were computed on different tokens (e.g. "
                         f"{', '.join(map(repr, changed[:3]))}; edited data, another "
                         "train.seq_length or data.overlong)")
        data_note = ("" if stamp["data"]["files_fingerprint"] == td.files_fingerprint
                     else " The data files changed since they were computed.")
        raise ReferenceLogpsError(f"reference log-probs at {path} are stale: "
                                  + "; ".join(parts) + "." + data_note + " " + recompute)
    return chosen, rejected, stamp


class PrecomputedReference:
    """Attaches stored reference log-probs to each batch's pairs."""

    def __init__(self, chosen: np.ndarray, rejected: np.ndarray, stamp: dict | None = None):
        self.chosen, self.rejected, self.stamp = torch.from_numpy(chosen), torch.from_numpy(
            rejected), stamp

    @classmethod
    def load(cls, cfg: AvrConfig, td: TrainingData) -> "PrecomputedReference":
        chosen, rejected, stamp = load_store(cfg, td)
        return cls(chosen, rejected, stamp)

    def attach(self, batches: list[PackedBatch]) -> None:
        for b in batches:
            units = b.pair_units
            b.ref_chosen, b.ref_rejected = self.chosen[units], self.rejected[units]

    flops_factor = 0.0  # no extra model passes


# --------------------------------------------------------------------------------------------
# Computing log-probs with a frozen model (online, and for `avr logps`)

def forward_sequence_logprobs(chunks, batches: list[PackedBatch], seq_logprobs: Callable,
                              *, use_te: bool, bf16: bool, seq_length: int,
                              bins_per_microbatch: int) -> list[torch.Tensor] | None:
    """Per-sequence log-probs of each batch from a forward-only pass through Megatron's
    schedule (any TP/PP/VPP). Returns one tensor per batch on the last pipeline stage, None on
    other stages. Under interleaving a count the schedule refuses is padded with repeats of the
    last batch, whose outputs are dropped."""
    from functools import partial

    from megatron.core import parallel_state

    from avr_megatron.training.losses.common import packed_forward
    from avr_megatron.training.schedule import run_schedule, schedule_shape

    def loss_func(batch, logits):
        seq = seq_logprobs(logits, batch).detach()
        return torch.zeros((), device=seq.device), {"seq": seq}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return packed_forward(model, batch, use_te=use_te, bf16=bf16), partial(loss_func, batch)

    s, mbs = schedule_shape(seq_length, bins_per_microbatch, use_te)
    out = run_schedule(forward_step, batches, chunks, seq_length=s, micro_batch_size=mbs,
                       forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    seqs = [o["seq"] for o in out]
    if not seqs:
        return []
    return list(torch.cat(seqs).cpu().split([len(x) for x in seqs]))  # one copy to the host


class OnlineReference:
    """A frozen copy of the reference model computes the reference log-probs of each step's
    batches with one extra forward pass (no stored file needed; costs that pass every step
    and the memory of a second set of weights)."""

    flops_factor = 1.0 / 3.0  # one forward on top of forward + backward (~3 forwards)

    def __init__(self, chunks, seq_logprobs: Callable, *, use_te: bool, bf16: bool,
                 seq_length: int, bins_per_microbatch: int):
        self.chunks = chunks
        self.seq_logprobs = seq_logprobs
        self.kw = dict(use_te=use_te, bf16=bf16, seq_length=seq_length,
                       bins_per_microbatch=bins_per_microbatch)

    def attach(self, batches: list[PackedBatch]) -> None:
        seqs = forward_sequence_logprobs(self.chunks, batches, self.seq_logprobs, **self.kw)
        if seqs is None:
            return  # only the last pipeline stage computes the loss
        for b, seq in zip(batches, seqs):
            b.ref_chosen, b.ref_rejected = seq[b.pair_chosen], seq[b.pair_rejected]


def build_reference_model(cfg: AvrConfig) -> list[torch.nn.Module]:
    """The reference model in this run's layout and reference precision (reference_config),
    weights from logps.reference (else model.init_from, else the same seeded random init as
    the policy), frozen."""
    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import seed_everything
    from avr_megatron.training.init import load_initial_weights

    seed_everything(cfg.run.seed)
    chunks = build_model(reference_config(cfg))
    load_initial_weights(chunks, cfg, reference_source(cfg), "logps.reference")
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


# --------------------------------------------------------------------------------------------
# `avr logps`: compute and store

def _atomic_parquet(table: dict, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(pa.table(table), tmp)


def _atomic_json(obj: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def _stamp_key(stamp: dict) -> dict:
    """What decides the stored values: not paths, layout or timing."""
    return {"format": stamp["format"], "reference": stamp["reference"]["fingerprint"],
            "tokenizer": stamp["tokenizer_fingerprint"],
            "examples": stamp["data"]["examples_fingerprint"],
            "tokenisation": stamp["tokenisation"], "precision": stamp["precision"]}


def compute_store(cfg: AvrConfig, td: TrainingData, chunks, layout, *, use_te: bool,
                  progress: bool = True) -> tuple[Path, bool]:
    """Run the frozen reference over every pair and write the store; returns (path, computed)
    (computed is False when an up-to-date store was already there). Work is split in rounds
    (logps.save_every microbatches per data-parallel rank); each finished round is saved as a
    part file, so an interrupted run resumes after its last finished round, in any layout."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from avr_megatron.data.batches import collate, trims_padding
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.training.losses.common import SequenceLogprobs

    path = store_path(cfg, _split(td))
    parts = path / PARTS
    stamp = make_stamp(cfg, td, layout)
    key = _stamp_key(stamp)
    rank0 = is_rank0()
    up_to_date = False
    if rank0 and (path / STAMP).is_file():
        up_to_date = _stamp_key(json.loads((path / STAMP).read_text())) == key
    if _broadcast_flag(up_to_date):
        return path, False
    if rank0:
        # The old table and stamp stop being valid now: remove the stamp first so that no crash
        # can leave a stamp describing another table.
        (path / STAMP).unlink(missing_ok=True)
        parts.mkdir(parents=True, exist_ok=True)
        for directory in (path, parts):  # temporaries of a killed run
            remove_stale(directory, STALE_FILE)
        previous = parts / STAMP
        if previous.is_file() and json.loads(previous.read_text()) != key:
            shutil.rmtree(parts)  # parts of another reference/data: start over
            parts.mkdir(parents=True)
        _atomic_json(key, parts / STAMP)

    mbs = cfg.train.micro_batch_size
    dp, dp_rank = layout.dp, parallel_state.get_data_parallel_rank()
    per_round = cfg.logps.save_every * mbs * dp  # bins per round, all ranks together
    num_rounds = -(-td.plan.num_bins // per_round)
    seq_logprobs = SequenceLogprobs(cfg.model.vocab_size, cfg.loss.logprob_chunk_size).sequences
    writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0)
    trim = trims_padding(use_te, layout.pp)
    start = time.time()
    bar = tqdm(range(num_rounds), desc="avr logps", unit="round",
               disable=not (progress and rank0) or None)  # None: on a terminal only
    for r in bar:
        part = parts / f"part-{r:06d}.parquet"
        if _broadcast_flag(rank0 and part.is_file()):
            continue
        bins = np.arange(r * per_round, min((r + 1) * per_round, td.plan.num_bins))
        mine = bins[dp_rank::dp]
        batches = [collate(td.data, td.plan, mine[k:k + mbs], td.chat.pad_id, trim=trim)
                   for k in range(0, len(mine), mbs)]
        rows = {"unit": [], "chosen": [], "rejected": []}
        if batches:
            seqs = forward_sequence_logprobs(
                chunks, batches, seq_logprobs, use_te=use_te, bf16=cfg.precision.bf16,
                seq_length=cfg.train.seq_length, bins_per_microbatch=mbs)
            if seqs is not None and writer:
                for b, seq in zip(batches, seqs):
                    rows["unit"] += b.pair_units.tolist()
                    rows["chosen"] += seq[b.pair_chosen].double().tolist()
                    rows["rejected"] += seq[b.pair_rejected].double().tolist()
        gathered = [rows]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if rank0 else None
            dist.gather_object(rows, gathered, dst=0)
        if rank0:
            units = [u for g in gathered for u in g["unit"]]
            table = {"id": [td.data.ids[u] for u in units],
                     "chosen": [x for g in gathered for x in g["chosen"]],
                     "rejected": [x for g in gathered for x in g["rejected"]],
                     "chosen_tokens": [td.data.sequence_targets(2 * u) for u in units],
                     "rejected_tokens": [td.data.sequence_targets(2 * u + 1) for u in units],
                     "example_hash": [td.data.example_hash(u) for u in units]}
            _atomic_parquet(table, part)
    if rank0:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
        merged = pa.concat_tables(tables)
        ids = merged.column("id").to_pylist()
        if len(ids) != len(td.data) or set(ids) != set(td.data.ids):
            raise ReferenceLogpsError(f"{parts}: the part files do not cover the data exactly "
                                      f"({len(ids)} rows for {len(td.data)} pairs); delete "
                                      f"{parts} and rerun")
        _atomic_parquet(merged.to_pydict(), path / TABLE)
        _atomic_json({**stamp, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "seconds": round(time.time() - start, 2)}, path / STAMP)
        shutil.rmtree(parts)
    if dist.is_initialized():
        dist.barrier()
    return path, True
