"""Load a recipe: YAML with inheritance (`defaults:`), a model preset, then `key=value` overrides,
merged onto the typed schema and validated before any work starts.

Inheritance follows NeMo-RL's convention: a recipe may name one or more parent recipes under
`defaults:` (paths relative to the recipe); parents are merged first, the recipe on top.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig
from avr_megatron.config.presets import PRESETS


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: recipe inheritance cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        where = f" (named in `defaults:` of {chain[-1]})" if chain else ""
        raise ConfigError(f"recipe file not found: {path}{where}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry line numbers
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    parents = node.pop("defaults", None)
    if parents is None:
        return node
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(parent), chain + (path,)))
    return OmegaConf.merge(merged, node)


def _all_keys(schema: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in schema.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        child = schema._get_node(k)
        if isinstance(child, DictConfig):
            keys.extend(_all_keys(child, full + "."))
    return keys


def _unknown_key_message(schema: DictConfig, full_key: str, source: str) -> str:
    candidates = difflib.get_close_matches(full_key, _all_keys(schema), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in candidates)}?" if candidates else ""
    return f"{source}: unknown key {full_key!r}{hint}"


def merge_checked(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        key = e.full_key or getattr(e, "key", "?")
        raise ConfigError(_unknown_key_message(base, str(key), source)) from None
    except ValidationError as e:
        raise ConfigError(f"{source}: key {e.full_key!r}: {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: cannot parse overrides {list(overrides)}: {e}") from None


def load_config(recipe: str | os.PathLike | None, overrides: Iterable[str] = (),
                validate: bool = True) -> AvrConfig:
    """Recipe file (or None for the schema defaults) + dotlist overrides -> validated AvrConfig."""
    overrides = list(overrides)
    raw = _read_yaml(Path(recipe)) if recipe is not None else OmegaConf.create()
    cli = _parse_overrides(overrides)
    source = str(recipe) if recipe is not None else "defaults"

    schema = OmegaConf.structured(AvrConfig)
    preset_name = OmegaConf.select(cli, "model.preset", default=None) or OmegaConf.select(
        raw, "model.preset", default=None)
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ConfigError(f"key 'model.preset': unknown preset {preset_name!r}; "
                              f"known: {', '.join(sorted(PRESETS))}")
        schema = merge_checked(schema, OmegaConf.create({"model": PRESETS[preset_name]}),
                                f"preset {preset_name}")
    merged = merge_checked(schema, raw, source)
    merged = merge_checked(merged, cli, "command line")
    try:
        cfg: AvrConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None
    if validate:
        from avr_megatron.config.validate import validate_config

        validate_config(cfg)
    return cfg


def to_yaml(cfg: AvrConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: AvrConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temp file + rename), readable by the group and
    others like any file the user creates (0644 under umask 022), and return its path."""
    from avr_megatron.runtime.files import atomic_write_text

    return atomic_write_text(path, to_yaml(cfg))
