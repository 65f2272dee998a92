"""Values a recipe marks "edit me": `/path/to/...`, `YOUR_...`, `CHANGE_ME`.

The full-scale recipes ship them for the paths, accounts and images only the user knows. A
placeholder must never reach a cluster: `avr pipeline` and the sbatch scripts
(avr_megatron/launch/plan.py) refuse them with the key named before anything is submitted,
and dry runs list them as warnings and still print the plan.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

PLACEHOLDER = re.compile(r"^/path/to(/|$)|YOUR_[A-Z0-9_]+|CHANGE_ME")

# Sections each kind of command reads (the rest of a recipe may keep placeholders it never
# uses: a training job does not need the synthesis reward model's path). None: everything.
SECTIONS_OF_COMMAND: dict[str, tuple[str, ...] | None] = {
    "train": ("run", "model", "parallel", "precision", "optimizer", "scheduler", "train", "data",
              "loss", "logps", "checkpoint", "logging"),
    "smoke": ("run", "model", "parallel", "precision", "optimizer", "scheduler", "train",
              "checkpoint", "logging"),
    "synth": ("run", "synth"),
    "pairs": ("run", "synth"),
    "eval": ("run", "synth", "eval"),
    "pipeline": None,
}
SECTIONS_OF_COMMAND["logps"] = SECTIONS_OF_COMMAND["train"]
SECTIONS_OF_COMMAND["convert"] = SECTIONS_OF_COMMAND["train"]


def find_placeholders(cfg: Any, sections: tuple[str, ...] | None = None) -> list[str]:
    """`key=value` of every placeholder value in the given top-level sections (all: None)."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and PLACEHOLDER.search(node):
            found.append(f"{key}={node}")

    for f in dataclasses.fields(cfg):
        if sections is None or f.name in sections:
            walk(getattr(cfg, f.name), f.name)
    return found


def pipeline_placeholders(cfg: Any, executor: str) -> list[str]:
    """What `avr pipeline` would use: every section, but the Slurm settings and container
    images only with the slurm executor."""
    found = find_placeholders(cfg)
    if executor != "slurm":
        found = [f for f in found if not f.startswith("launch.")
                 and ".container_image=" not in f]
    return found


def placeholder_message(found: list[str]) -> str:
    return ("the recipe still has placeholder values (edit them in your copy of the recipe or "
            "override them, e.g. key=value): " + ", ".join(found))
