"""Megatron dist checkpoints (torch_dist) of model chunks, optimizer and trainer state, written
atomically: each save goes to a hidden temporary directory that rank 0 renames into place after
every rank finished, then the `latest` pointer is replaced. A crash mid-save leaves the previous
checkpoint and pointer untouched; old iterations beyond `keep_last` are removed afterwards.

Model weights reshard on load (save at TP=1, load at TP=2, other PP/VPP layouts); optimizer state
is saved `dp_reshardable` (Megatron's fast format: it reshards across DP only).

    <root>/latest                 "iter_0000100"
    <root>/iter_0000100/          dist checkpoint + avr_checkpoint.json + config.yaml
    <root>/iter_0000100/hf/       optional: tokenizer, chat template, HF config.json ... of the
                                  Hugging Face model it came from (see avr_megatron.conversion)

`read_config` rebuilds the recipe (model section included) a checkpoint was saved with, so
tools such as `avr convert mcore-to-hf` need nothing but the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from avr_megatron.checkpoint import safe_load
from avr_megatron.config import AvrConfig, save_config
from avr_megatron.models.llama import unwrap
from avr_megatron.runtime.files import (STALE_FILE, atomic_write_text, describe_error, publish_dir,
                                        remove_stale)

log = logging.getLogger(__name__)
FORMAT = "avr-megatron/dist-ckpt/1"
META_FILE = "avr_checkpoint.json"
CONFIG_FILE = "config.yaml"
HF_ASSETS_DIR = "hf"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(RuntimeError):
    pass


class RefusedCheckpointError(CheckpointError):
    """The checkpoint holds a pickle that would run code (see safe_load): never fall back."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def chunk_key(i: int, num_chunks: int) -> str:
    """The state-dict key of model chunk i (Megatron's: `model`, or `model0`, `model1`, ...
    with virtual pipeline stages). Look chunks up by index, never by sorting these strings:
    `model10` sorts before `model2`."""
    return "model" if num_chunks == 1 else f"model{i}"


def _model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    return {chunk_key(i, len(chunks)): unwrap(c).sharded_state_dict()
            for i, c in enumerate(chunks)}


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a root holding `latest` / iter_* directories -> the newest
    complete checkpoint. Raises CheckpointError naming what is missing."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: directory does not exist")
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if is_checkpoint(target):
            return target
    complete = sorted((int(m.group(1)), p) for p in path.iterdir()
                      if (m := _ITER_DIR.match(p.name)) and is_checkpoint(p))
    if not complete:
        raise CheckpointError(f"no complete checkpoint under {path} (no {META_FILE} found)")
    return complete[-1][1]


def checkpoints_newest_first(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under a root: the one `latest` names first, then the others
    from the highest iteration down."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ITER_DIR.match(p.name)) and is_checkpoint(p)]
    order = [p for _, p in sorted(found, reverse=True)]
    latest = root / "latest"
    if latest.is_file():
        target = root / latest.read_text().strip()
        if target in order:
            order.remove(target)
            order.insert(0, target)
    return order


def load_newest_intact(root: str | os.PathLike, chunks: list[torch.nn.Module], *, optimizer=None,
                       scheduler=None, any_rank=None, **load_options) -> tuple[dict, Path] | None:
    """Resume: load the newest checkpoint under `root` that loads, falling back to older ones
    (with a warning naming the bad one) when the newest is truncated or corrupted; each attempt
    replaces every weight and optimizer value, so a failed partial load leaves nothing behind.
    `any_rank(failed) -> bool` makes all ranks agree to fall back together; `load_options` go
    to `load_checkpoint`. None when there is
    no checkpoint; CheckpointError when none loads, or one is refused as unsafe."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    candidates = checkpoints_newest_first(root)
    errors = []
    for i, ckpt in enumerate(candidates):
        error: BaseException | None = None
        try:
            meta = load_checkpoint(ckpt, chunks, optimizer=optimizer, scheduler=scheduler,
                                   **load_options)
        except RefusedCheckpointError:
            raise
        except (Exception, CheckpointException) as e:
            error = e
        failed = any_rank(error is not None) if any_rank is not None else error is not None
        if not failed:
            return meta, ckpt
        reason = (describe_error(error) if error is not None
                  else "it failed to load on another rank")
        errors.append(f"{ckpt.name} ({reason})")
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None
        log.warning("checkpoint %s cannot be loaded (%s); %s", ckpt, reason,
                    f"falling back to the previous one, {nxt}" if nxt else "no older one left")
    if candidates:
        raise CheckpointError(f"no checkpoint under {root} loads: {'; '.join(errors)}")
    return None


def read_meta(path: str | os.PathLike) -> dict:
    ckpt = resolve(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / META_FILE}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def checkpoint_meta(iteration: int, cfg: AvrConfig, *, has_optimizer: bool, num_chunks: int,
                    state: dict[str, Any] | None = None, **extra: Any) -> dict:
    """The avr_checkpoint.json record (also written by the HF converter)."""
    return {"format": FORMAT, "iteration": iteration, "has_optimizer": has_optimizer,
            "num_chunks": num_chunks, "state": state or {},
            "parallel": {"tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                         "pipeline_model_parallel_size":
                         cfg.parallel.pipeline_model_parallel_size,
                         "virtual_pipeline_model_parallel_size":
                         cfg.parallel.virtual_pipeline_model_parallel_size},
            **extra}


def write_latest(root: str | os.PathLike, name: str) -> None:
    """Point `<root>/latest` at checkpoint directory `name` (atomic replace)."""
    atomic_write_text(Path(root) / "latest", name)


def read_config(path: str | os.PathLike) -> AvrConfig:
    """The validated recipe a checkpoint was saved with (its config.yaml)."""
    from avr_megatron.config import ConfigError, load_config

    ckpt = resolve(path)
    file = ckpt / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt}: no {CONFIG_FILE}: cannot rebuild the model config")
    try:
        return load_config(file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def hf_assets(path: str | os.PathLike) -> Path | None:
    """The checkpoint's `hf/` folder (tokenizer, HF config...), or None when it has none."""
    folder = resolve(path) / HF_ASSETS_DIR
    return folder if folder.is_dir() else None


def save_checkpoint(root: str | os.PathLike, iteration: int, chunks: list[torch.nn.Module],
                    cfg: AvrConfig, *, optimizer=None, scheduler=None,
                    state: dict[str, Any] | None = None, keep_last: int | None = None,
                    hf_assets_from: str | os.PathLike | None = None) -> Path:
    """Save on every rank (collective). `state` is small JSON-able trainer state (iteration,
    consumed samples, data position...). `hf_assets_from`: a folder (e.g. `hf_assets(init
    checkpoint)`) copied into the checkpoint's `hf/`, so it exports to HF with its tokenizer.
    Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / iter_dir_name(iteration)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Partial saves of killed runs (one trainer writes a checkpoint root at a time).
        for stale in root.glob(".iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        remove_stale(root, STALE_FILE)  # a `latest` pointer being written when killed
        tmp.mkdir()
    _barrier()
    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        # Before its first successful step (every step so far non-finite, or a save at once)
        # torch's Adam has no state, which Megatron's distributed optimizer cannot save (a bare
        # AssertionError): give it the never-stepped state explicitly (zero moments, step 0),
        # which steps exactly like no state and is saved and resumed like any other.
        _materialize_optimizer_state(optimizer, fresh=True)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        sharded["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(sharded, str(tmp),
                            sharded_strategy=_save_strategy(cfg.checkpoint.fully_parallel_save))
    _barrier()
    if _rank() == 0:
        meta = checkpoint_meta(iteration, cfg, has_optimizer=optimizer is not None,
                               num_chunks=len(chunks), state=state,
                               optimizer_steps=_adam_steps(optimizer) if optimizer is not None
                               else None)
        save_config(cfg, tmp / CONFIG_FILE)
        if hf_assets_from is not None:
            shutil.copytree(hf_assets_from, tmp / HF_ASSETS_DIR)
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        if final.exists():  # a re-save of the same iteration replaces it
            shutil.rmtree(final)
        publish_dir(tmp, final)
        write_latest(root, final.name)
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def save_failure(root: str | os.PathLike, iteration: int, error: BaseException):
    """After a failed `save_checkpoint`: a StorageError (disk full, read-only, ...) naming the
    path, the checkpoint kept and how to resume, or None when the storage is not the cause. The
    partial save is removed (rank 0) after the diagnosis, freeing its space."""
    from avr_megatron.runtime.files import storage_error

    root = Path(root)
    tmp = root / f".{iter_dir_name(iteration)}.tmp"
    kept = checkpoints_newest_first(root)
    err = storage_error(tmp if tmp.parent.is_dir() else root, error,
                        kept=(f"the previous checkpoint {kept[0]}" if kept else
                              "no checkpoint (none was saved before)") +
                        "; the partial save was removed",
                        resume="free space (or make it writable) and rerun the same command: "
                               + (f"it resumes from {kept[0].name}" if kept else
                                  "it starts again from the beginning"))
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return err


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _ITER_DIR.match(p.name)) and is_checkpoint(p))
    for _, old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside Megatron's (chained) optimizer wrappers."""
    return [getattr(opt, "optimizer", None)
            for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_steps(optimizer) -> list[float | None]:
    """Per inner torch optimizer, the step count kept in its per-parameter state (torch Adam;
    Apex/TE fused Adam keep it in the param groups instead: None)."""
    steps = []
    for inner in _inner_optimizers(optimizer):
        values = {float(st["step"]) for st in (inner.state.values() if inner is not None else [])
                  if torch.is_tensor(st.get("step"))}
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def _restore_adam_steps(optimizer, steps: list[float | None] | None) -> None:
    """Megatron's distributed-optimizer load (dp_reshardable) restores torch Adam's per-parameter
    `step` from the local, not the saved, value and makes all parameters share one step tensor
    (which torch Adam then increments once per parameter): Adam's bias correction after a resume
    would differ from the uninterrupted run. Put back the saved count, one tensor per parameter.
    (With Apex/TE fused Adam, the step lives in the param groups and loads correctly.)"""
    if not steps:
        return
    for inner, step in zip(_inner_optimizers(optimizer), steps):
        if inner is None or step is None:
            continue
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)


def _materialize_optimizer_state(optimizer, fresh: bool = False) -> None:
    """Give a never-stepped optimizer its state tensors before loading into it (or saving it).
    Without Apex/TE Megatron wraps torch's Adam, whose per-parameter state (including `step`)
    only exists after a first step, and the distributed optimizer's state_dict requires it (a
    resume happens before any step). One step with zero gradients and lr=0 creates the state
    without changing any parameter (also with decoupled weight decay); the loaded values then
    replace it. `fresh`: then reset every state tensor to zero (moments and step), the state of
    a never-stepped optimizer: the next real step is the same as from no state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params or all(len(inner.state.get(p, {})) for p in params):
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        grads = [p.grad for p in params]
        with torch.no_grad():
            for g in inner.param_groups:
                g["lr"] = 0.0
            for p in params:
                p.grad = torch.zeros_like(p)
            inner.step()
            if fresh:
                for p in params:
                    for value in inner.state[p].values():
                        if torch.is_tensor(value):
                            value.zero_()
            for g, lr in zip(inner.param_groups, lrs):
                g["lr"] = lr
            for p, grad in zip(params, grads):
                p.grad = grad


def _extra_state_objects(sharded: dict) -> dict[str, list[tuple[str, str]]]:
    """Dist-checkpoint key -> [(chunk key, state-dict name)] of every model `_extra_state`
    object requested. Such an object may be absent from a checkpoint and the load still be
    complete: Transformer Engine's RMSNorm (the TE spec's final norm) has one, Megatron's local
    norm has none, so a checkpoint converted from HF before the converter wrote it, or saved by
    a local-spec run, lacks `decoder.final_layernorm._extra_state`. Its module then keeps its
    fresh state, as the linears do when their stored value is None."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out: dict[str, list[tuple[str, str]]] = {}
    for ck, state in sharded.items():
        if not ck.startswith("model"):
            continue
        for name, value in state.items():
            if isinstance(value, ShardedObject) and name.rsplit(".", 1)[-1] == "_extra_state":
                out.setdefault(value.key, []).append((ck, name))
    return out


def _data_parallel_group():
    """The ranks holding replicas of the same shards (data parallel, with context parallel),
    or None when there is only one."""
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def _save_strategy(fully_parallel: bool):
    """torch_dist; fully parallel: each replicated shard is written by one of its data-parallel
    holders, spread evenly, rather than all by data-parallel rank 0 (Megatron-LM's
    --ckpt-fully-parallel-save, its default)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy("torch_dist")
    group = _data_parallel_group() if fully_parallel else None
    return strategy if group is None else FullyParallelSaveStrategyWrapper(strategy, group)


def _load_strategy(ckpt: Path, fully_parallel: bool):
    """torch_dist; fully parallel: the data-parallel ranks each read part of the replicated
    shards and exchange them (Megatron-LM's --ckpt-fully-parallel-load)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    strategy = get_default_load_sharded_strategy(str(ckpt))
    group = _data_parallel_group() if fully_parallel else None
    return strategy if group is None else FullyParallelLoadStrategyWrapper(strategy, group)


def load_checkpoint(path: str | os.PathLike, chunks: list[torch.nn.Module], *, optimizer=None,
                    scheduler=None, strict: bool = True, fully_parallel: bool = False) -> dict:
    """Load weights (any TP/PP layout) and, when given, optimizer and scheduler state (same
    TP/PP layout as saved). Returns the checkpoint's metadata (with `state`). `fully_parallel`:
    checkpoint.fully_parallel_load (the data-parallel ranks share the reading).

    Every tensor the model and optimizer need must be in the checkpoint; of the `_extra_state`
    objects only those may be missing (see _extra_state_objects). Transformer Engine FP8 extra
    state is vetted by checkpoint.extra_state before TE unpickles it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from avr_megatron.checkpoint.extra_state import (
        UnsafeExtraStateError,
        te_may_unpickle,
        vet_state_dict,
    )

    ckpt = resolve(path)
    meta = read_meta(ckpt)
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"{ckpt} has no optimizer state (saved weights only)")
    safe_load.install()  # no pickle from the checkpoint runs code (see safe_load)
    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                            metadata=_OPTIM_METADATA)
    extra = _extra_state_objects(sharded)
    try:
        with safe_load.guarded():
            safe_load.check_legacy_common(ckpt)
            loaded, _, absent = dist_checkpointing.load(
                sharded, str(ckpt), sharded_strategy=_load_strategy(ckpt, fully_parallel),
                strict=StrictHandling.RETURN_UNEXPECTED)
    except safe_load.UnsafeCheckpointError as e:
        raise RefusedCheckpointError(f"{ckpt}: not loaded: {e}") from None
    lacking = sorted(key for key in absent if key not in extra)
    if lacking:
        raise CheckpointError(f"{ckpt} lacks {len(lacking)} tensor(s) or object(s) this model "
                              f"needs: {', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")
    tolerated = {(ck, name) for key in absent for ck, name in extra[key]}
    for i, chunk in enumerate(chunks):
        ck = chunk_key(i, len(chunks))
        state = loaded[ck]
        try:
            te_pickles = vet_state_dict(state, ck)
        except UnsafeExtraStateError as e:
            raise RefusedCheckpointError(f"{ckpt}: not loaded: {e}") from None
        with te_may_unpickle(te_pickles):
            result = unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if (ck, k) not in tolerated]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(f"{ckpt} does not fit the model ({ck}): missing "
                                  f"{missing or 'nothing'}, unexpected "
                                  f"{result.unexpected_keys or 'nothing'}")
    if optimizer is not None:
        # fp32 runs: the distributed optimizer's main params are views of the model params, and
        # Megatron copies into them outside no_grad.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, meta.get("optimizer_steps"))
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    return meta
