"""Dataset record shapes: flat dicts ready for JSONL/Parquet and loadable by `datasets`.

Every record of a kind has the same columns (None where a value does not apply), so Parquet
shards written by different workers concatenate; `COLUMN_TYPES` names each column's type so a
writer can give Arrow an explicit schema instead of inferring `null` from an all-None shard.

SFT records (`SFT_COLUMNS`): `messages` is the whole conversation, ending with the assistant turn
to learn. Preference records (`PREFERENCE_COLUMNS`) use TRL's conversational format: `prompt`
is the conversation so far (ends with a user turn), `chosen` / `rejected` are one assistant
message each. `reward_chosen` / `reward_rejected` are the quantities the acceptance rule compared
(criticism pairs: criticism values, i.e. mean improvement rewards; all other pairs: r(x, y)), and
`reward_gap` = reward_chosen - reward_rejected. `reward_base` is r(x, y0) of the answer being
refined (thought pairs: the source answer's reward). `round` is the refinement round the target
text comes from (stage 1: 1; thought SFT: the round of the final answer; n/a: None). Provenance
columns (`model`, `reward_model`, `temperature`, `top_p`, `max_tokens`, `seed`) describe how the
texts were sampled and scored; `seed` is the base seed (per-request seeds derive from it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from avr_megatron.method import _check
from avr_megatron.method.chat import Message, check_text, message, validate_conversation
from avr_megatron.method.requests import make_key
from avr_megatron.method.rewards import check_reward
from avr_megatron.method.tree import Provenance

SFT_KINDS = ("rsft", "thought", "source")
PAIR_TYPES = ("response", "criticism", "improvement", "thought")

_PROVENANCE_COLUMNS = ("model", "reward_model", "temperature", "top_p", "max_tokens", "seed")

SFT_COLUMNS = (
    "id", "kind", "stage", "prompt_id", "messages", "round",
    "reward", "reward_base", "reward_gain", *_PROVENANCE_COLUMNS,
)
PREFERENCE_COLUMNS = (
    "id", "pair_type", "stage", "prompt_id", "prompt", "chosen", "rejected", "round",
    "reward_chosen", "reward_rejected", "reward_gap", "reward_base", *_PROVENANCE_COLUMNS,
)

# "messages": list of {"role": string, "content": string}. Every column except id, kind /
# pair_type, prompt_id and the message columns may be None.
COLUMN_TYPES: dict[str, str] = {
    "id": "string", "kind": "string", "pair_type": "string", "stage": "int64", "prompt_id": "string",
    "messages": "messages", "prompt": "messages", "chosen": "messages", "rejected": "messages",
    "round": "int64", "reward": "float64", "reward_base": "float64", "reward_gain": "float64",
    "reward_chosen": "float64", "reward_rejected": "float64", "reward_gap": "float64",
    "model": "string", "reward_model": "string", "temperature": "float64", "top_p": "float64",
    "max_tokens": "int64", "seed": "int64",
}
_REQUIRED = {"id", "kind", "pair_type", "prompt_id", "messages", "prompt", "chosen", "rejected"}


def _provenance_columns(provenance: Provenance | None) -> dict[str, Any]:
    if provenance is None:
        return dict.fromkeys(_PROVENANCE_COLUMNS)
    s = provenance.sampling
    return {
        "model": provenance.model,
        "reward_model": provenance.reward_model,
        "temperature": float(s.temperature),
        "top_p": float(s.top_p),
        "max_tokens": s.max_tokens,
        "seed": s.seed,
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def sft_record(
    *,
    id: str,
    kind: str,
    stage: int | None,
    prompt_id: str,
    messages: Sequence[Message],
    round: int | None,
    reward: float | None,
    reward_base: float | None,
    provenance: Provenance | None,
) -> dict[str, Any]:
    record = {
        "id": id,
        "kind": kind,
        "stage": stage,
        "prompt_id": prompt_id,
        "messages": [dict(m) for m in messages],
        "round": round,
        "reward": reward,
        "reward_base": reward_base,
        "reward_gain": _difference(reward, reward_base),
        **_provenance_columns(provenance),
    }
    return validate_sft_record(record, f"sft record {id!r}")


def source_sft_record(prompt_id: str, messages: Sequence[Message]) -> dict[str, Any]:
    """A source dataset's own chosen conversation, mixed into RSFT as the reference did."""
    return sft_record(
        id=make_key(prompt_id, "source"), kind="source", stage=None, prompt_id=prompt_id, messages=messages,
        round=None, reward=None, reward_base=None, provenance=None,
    )


def preference_record(
    *,
    id: str,
    pair_type: str,
    stage: int,
    prompt_id: str,
    prompt: Sequence[Message],
    chosen: str,
    rejected: str,
    round: int | None,
    reward_chosen: float,
    reward_rejected: float,
    reward_base: float | None,
    provenance: Provenance | None,
) -> dict[str, Any]:
    where = f"preference record {id!r}"
    reward_chosen = check_reward(reward_chosen, f"{where}.reward_chosen")
    reward_rejected = check_reward(reward_rejected, f"{where}.reward_rejected")
    record = {
        "id": id,
        "pair_type": pair_type,
        "stage": stage,
        "prompt_id": prompt_id,
        "prompt": [dict(m) for m in prompt],
        "chosen": [message("assistant", chosen)],
        "rejected": [message("assistant", rejected)],
        "round": round,
        "reward_chosen": reward_chosen,
        "reward_rejected": reward_rejected,
        "reward_gap": reward_chosen - reward_rejected,
        "reward_base": reward_base,
        **_provenance_columns(provenance),
    }
    return validate_preference_record(record, where)


def _columns(record: Any, columns: Sequence[str], where: str) -> dict[str, Any]:
    d = _check.mapping(record, where, columns)
    for col in columns:
        value, at = d[col], f"{where}.{col}"
        kind = COLUMN_TYPES[col]
        if value is None:
            if col in _REQUIRED:
                raise ValueError(f"{at}: must not be None")
        elif kind == "string":
            _check.string(value, at)
        elif kind == "int64":
            _check.integer(value, at)
        elif kind == "float64":
            _check.number(value, at)
    return dict(d)


def validate_sft_record(record: Any, where: str = "sft record") -> dict[str, Any]:
    d = _columns(record, SFT_COLUMNS, where)
    if d["kind"] not in SFT_KINDS:
        raise ValueError(f"{where}.kind: expected one of {', '.join(SFT_KINDS)}, got {d['kind']!r}")
    validate_conversation(d["messages"], f"{where}.messages", last_role="assistant")
    if d["reward_gain"] != _difference(d["reward"], d["reward_base"]):
        raise ValueError(f"{where}.reward_gain: must equal reward - reward_base")
    return d


def validate_preference_record(record: Any, where: str = "preference record") -> dict[str, Any]:
    d = _columns(record, PREFERENCE_COLUMNS, where)
    if d["pair_type"] not in PAIR_TYPES:
        raise ValueError(f"{where}.pair_type: expected one of {', '.join(PAIR_TYPES)}, got {d['pair_type']!r}")
    validate_conversation(d["prompt"], f"{where}.prompt", last_role="user")
    for col in ("chosen", "rejected"):
        turns = _check.sequence(d[col], f"{where}.{col}")
        if len(turns) != 1:
            raise ValueError(f"{where}.{col}: expected exactly one assistant message, got {len(turns)}")
        m = _check.mapping(turns[0], f"{where}.{col}[0]", ("role", "content"))
        if m["role"] != "assistant":
            raise ValueError(f"{where}.{col}[0].role: expected 'assistant', got {m['role']!r}")
        check_text(m["content"], f"{where}.{col}[0].content")
    for col in ("reward_chosen", "reward_rejected"):
        if d[col] is None:
            raise ValueError(f"{where}.{col}: must not be None")
    if d["reward_gap"] != d["reward_chosen"] - d["reward_rejected"]:
        raise ValueError(f"{where}.reward_gap: must equal reward_chosen - reward_rejected")
    return d


def content_key(record: dict[str, Any]) -> str:
    """What training sees of a record: the conversation (SFT) or prompt, chosen and rejected
    (pairs). Two records with one key are duplicates whatever their ids and metadata."""
    if "messages" in record:
        return json.dumps(record["messages"], ensure_ascii=False)
    return json.dumps([record["prompt"], record["chosen"], record["rejected"]], ensure_ascii=False)


def deduplicate(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(first record of each content, the later duplicates), in input order (the reference
    de-duplicated every dataset it wrote)."""
    seen: set[str] = set()
    kept, dropped = [], []
    for record in records:
        key = content_key(record)
        (dropped if key in seen else kept).append(record)
        seen.add(key)
    return kept, dropped
