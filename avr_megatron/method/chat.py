"""Chat messages as plain `{"role", "content"}` dicts, and the one validator that every builder and
record uses, so a malformed conversation fails where it enters rather than inside a chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]

ROLES = ("system", "user", "assistant")


def message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def check_text(value: Any, where: str) -> str:
    """A text the model reads or writes: a str with some non-whitespace character."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: is empty or whitespace only")
    return value


def validate_conversation(messages: Any, where: str, *, last_role: str | None = None) -> list[Message]:
    """Check `messages` and return a fresh copy (so records never alias the caller's dicts).

    Rules: a non-empty list of dicts with exactly the keys `role` and `content`; roles are
    system/user/assistant; contents are non-blank strings; a system message may only come first;
    the first other turn is `user` and turns then alternate; `last_role`, when given, is the role
    the conversation must end with (`user` for a prompt, `assistant` for an answer to score).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: conversation is empty")
    out: list[Message] = []
    expected: str | None = None
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        extra = sorted(str(k) for k in m if k not in ("role", "content"))
        if extra:
            raise ValueError(f"{at}: unexpected keys {extra} (messages have only 'role' and 'content')")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{at}.{key}: missing")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{at}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        check_text(m["content"], f"{at}.content")
        if role == "system":
            if i != 0:
                raise ValueError(f"{at}.role: a system message may only come first")
        else:
            want = expected or "user"
            if role != want:
                rule = "the first non-system turn must be 'user'" if expected is None else "turns must alternate"
                raise ValueError(f"{at}.role: expected {want!r} ({rule}), got {role!r}")
            expected = "assistant" if role == "user" else "user"
        out.append(message(role, m["content"]))
    if expected is None:
        raise ValueError(f"{where}: has no user turn")
    if last_role is not None and out[-1]["role"] != last_role:
        raise ValueError(
            f"{where}[{len(out) - 1}].role: the conversation must end with a {last_role!r} turn, "
            f"got {out[-1]['role']!r}"
        )
    return out
