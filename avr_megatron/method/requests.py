"""What the method asks of engines. Tree building and search never call an engine: they emit
requests and consume results, so the synthesis driver can batch every pending call of every
prompt into one big engine call (frontier batching).

Keys are unique and deterministic: `<prompt id>/<stage>/...` built by `make_key`, with the prompt id
percent-escaped so that distinct prompt ids can never produce the same key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Union

from avr_megatron.method.chat import Message, validate_conversation
from avr_megatron.method.rewards import check_reward


@dataclass(frozen=True)
class SamplingParams:
    # The reference sampled with temperature 0.7 and top_p 0.8.
    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 2048
    # None: engine's own randomness. An int: each request gets its own seed derived from this
    # one and its key (see `for_key`), so reruns reproduce and no two requests share a stream.
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = sampling_problems(asdict(self))
        if problems:
            raise ValueError(problems[0])

    def for_key(self, key: str) -> SamplingParams:
        """These parameters with the per-request seed of `key` (unchanged when seed is None)."""
        if self.seed is None:
            return self
        digest = hashlib.sha256(f"{self.seed}/{key}".encode()).digest()
        return SamplingParams(self.temperature, self.top_p, self.max_tokens, int.from_bytes(digest[:4], "big") >> 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "sampling") -> SamplingParams:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
        problems = sampling_problems({**asdict(cls()), **d}, where)
        if problems:
            raise ValueError(problems[0])
        return cls(**dict(d))

    @classmethod
    def from_section(cls, section: Any, seed: int | None = None,
                     where: str = "sampling") -> SamplingParams:
        """From a recipe section holding these fields (synth.sampling, synth.thoughts,
        eval.sampling: their own defaults, one copy of the rules), with the run's seed."""
        values = {f.name: getattr(section, f.name) for f in fields(cls)
                  if hasattr(section, f.name)}
        return cls.from_dict({**values, "seed": seed}, where)


def sampling_problems(values: Mapping[str, Any], where: str = "sampling") -> list[str]:
    """The rules of SamplingParams' fields, each message naming `where`.<field>."""
    errs = []
    t, p, n, s = (values.get(k) for k in ("temperature", "top_p", "max_tokens", "seed"))
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        errs.append(f"{where}.temperature: expected a number >= 0, got {t!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
        errs.append(f"{where}.top_p: expected a number in (0, 1], got {p!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        errs.append(f"{where}.max_tokens: expected an integer >= 1, got {n!r}")
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
        errs.append(f"{where}.seed: expected None or an integer >= 0, got {s!r}")
    return errs


@dataclass(frozen=True)
class GenerateRequest:
    """Sample `n` continuations of `messages` (ending with a user turn); answer: list of n str."""

    key: str
    messages: list[Message]
    n: int
    sampling: SamplingParams

    def __post_init__(self) -> None:
        check_key(self.key)
        validate_conversation(self.messages, f"request {self.key!r}: messages", last_role="user")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"request {self.key!r}: n: expected an integer >= 1, got {self.n!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"request {self.key!r}: sampling: expected SamplingParams")


@dataclass(frozen=True)
class ScoreRequest:
    """Reward-model score r(x, y) of `messages` = `[*x, assistant y]`; answer: one float."""

    key: str
    messages: list[Message]

    def __post_init__(self) -> None:
        check_key(self.key)
        validate_conversation(self.messages, f"request {self.key!r}: messages", last_role="assistant")


Request = Union[GenerateRequest, ScoreRequest]
# What a driver feeds back: key -> list of n texts (generate) or one reward (score).
Result = Union[list[str], float]
Results = Mapping[str, Result]


def _escape_id(prompt_id: str) -> str:
    return prompt_id.replace("%", "%25").replace("/", "%2F")


def make_key(prompt_id: str, *parts: str) -> str:
    """`<escaped prompt id>/<part>/<part>...`; parts are ours and never contain '/'."""
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ValueError(f"prompt_id: expected a non-empty string, got {prompt_id!r}")
    for p in parts:
        if not p or "/" in p:
            raise ValueError(f"key part {p!r}: must be non-empty and free of '/'")
    return "/".join((_escape_id(prompt_id), *parts))


def key_prompt_id(key: str) -> str:
    """The prompt id a key belongs to (inverse of `make_key`'s escaping)."""
    return check_key(key).split("/", 1)[0].replace("%2F", "/").replace("%25", "%")


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"request key: expected a non-empty string, got {key!r}")
    return key


def check_result(request: Request, value: Any) -> list[str] | float:
    """Validate an engine answer for `request`; ValueError names the key."""
    where = f"result for {request.key!r}"
    if isinstance(request, GenerateRequest):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{where}: expected a list of {request.n} strings, got {type(value).__name__}")
        if len(value) != request.n:
            raise ValueError(f"{where}: expected {request.n} texts, got {len(value)}")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise ValueError(f"{where}[{i}]: expected a string, got {type(text).__name__}")
        return list(value)
    return check_reward(value, where)


def check_unique_keys(requests: Sequence[Request]) -> None:
    """ValueError naming the first key that two requests share (e.g. duplicate prompt ids)."""
    seen: set[str] = set()
    for r in requests:
        if r.key in seen:
            raise ValueError(f"duplicate request key {r.key!r} (are the prompt ids unique?)")
        seen.add(r.key)
