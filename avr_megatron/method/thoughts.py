"""The long refinement thought (stage 2): one assistant turn that shows the whole refinement, then
the answer the user is shown.

Layout (each item starts a new line; `seg(t)` is the escaped text, see below):

    <thought_open>
    <draft_label>
    seg(first answer)
    <review_label>             \\  once per improving round:
    seg(criticism)              |  the criticism that led to the kept improvement,
    <revision_label>            |  then that improvement
    seg(improvement)           /
    <review_label>
    seg(criticism of the failed round)
    <closing_line>
    <thought_close>
    <final_answer_prefix>
    seg(final answer)

Markers. A line is a marker when, stripped of surrounding whitespace, it equals one of the six
line markers (open, draft, review, revision, closing line, close), or when, stripped of leading
whitespace, it starts with the final-answer prefix ("Final answer: 42" is a delimiter too; text
after the prefix on that line belongs to the answer, minus one separator: a newline, CRLF or space).

Escaping (the rule that makes render -> parse exact for any text). Texts are split on "\\n" only.
A text line whose form without leading backslashes is a marker gets one more backslash in front;
parsing removes one backslash from any line that starts with a backslash and whose form without
leading backslashes is a marker. So an answer line "Final answer: 42" is written
"\\Final answer: 42", a line "\\Final answer: 42" is written "\\\\Final answer: 42", and every
other line is written as is. An escaped line never reads as a marker (markers cannot start with a
backslash), so the only markers in a rendered thought are the structural ones. The final answer is
escaped too, so the delimiter is unambiguous: `extract_final_answer` takes the text after the last
delimiter that is not inside an open thought (after an opening marker with no closing marker
since), and unescapes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from avr_megatron.method.chat import check_text
from avr_megatron.method.prompts import PromptTemplates

DEFAULT_TEMPLATES = PromptTemplates()

_OPEN, _DRAFT, _REVIEW, _REVISION, _CLOSING, _CLOSE, _FINAL = "O", "D", "R", "V", "L", "C", "F"
_GRAMMAR = re.compile(r"OD(?:RV)*RLC")
_NAMES = {
    _OPEN: "opening marker", _DRAFT: "draft label", _REVIEW: "review label", _REVISION: "revision label",
    _CLOSING: "closing line", _CLOSE: "closing marker", _FINAL: "final-answer delimiter",
}


@dataclass(frozen=True)
class RefinementThought:
    """What a thought shows: the first answer, each improving round as (criticism, improvement),
    and the criticism of the failed round. The final answer is the last improvement."""

    first_answer: str
    steps: tuple[tuple[str, str], ...]
    failed_criticism: str

    def __post_init__(self) -> None:
        check_text(self.first_answer, "thought.first_answer")
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Sequence):
            raise ValueError("thought.steps: expected a list of (criticism, improvement) pairs")
        steps = []
        for i, step in enumerate(self.steps):
            if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or len(step) != 2:
                raise ValueError(f"thought.steps[{i}]: expected a (criticism, improvement) pair")
            steps.append((check_text(step[0], f"thought.steps[{i}].criticism"), check_text(step[1], f"thought.steps[{i}].improvement")))
        object.__setattr__(self, "steps", tuple(steps))
        check_text(self.failed_criticism, "thought.failed_criticism")

    @property
    def final_answer(self) -> str:
        return self.steps[-1][1] if self.steps else self.first_answer

    @property
    def answers(self) -> list[str]:
        return [self.first_answer, *(y for _, y in self.steps)]

    @property
    def criticisms(self) -> list[str]:
        return [*(c for c, _ in self.steps), self.failed_criticism]


@dataclass(frozen=True)
class ParsedThought:
    # Unescaped text after the last valid delimiter; None when there is none or it is blank.
    final_answer: str | None
    well_formed: bool
    # Reviews in the thought (improving rounds + the failed one).
    n_rounds: int
    problems: list[str] = field(default_factory=list)
    # The answers (draft, then revisions) and reviews found, unescaped, in order.
    answers: list[str] = field(default_factory=list)
    criticisms: list[str] = field(default_factory=list)

    def thought(self) -> RefinementThought | None:
        """The structured thought, for a well-formed parse."""
        if not self.well_formed:
            return None
        steps = tuple(zip(self.criticisms[:-1], self.answers[1:]))
        return RefinementThought(self.answers[0], steps, self.criticisms[-1])


def _kind(line: str, t: PromptTemplates) -> str | None:
    stripped = line.strip()
    for kind, marker in (
        (_OPEN, t.thought_open), (_DRAFT, t.draft_label), (_REVIEW, t.review_label),
        (_REVISION, t.revision_label), (_CLOSING, t.closing_line), (_CLOSE, t.thought_close),
    ):
        if stripped == marker:
            return kind
    if line.lstrip().startswith(t.final_answer_prefix):
        return _FINAL
    return None


def escape(text: str, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """Add one backslash to every line that would otherwise read as (or unescape to) a marker."""
    return "\n".join(
        "\\" + line if _kind(line.lstrip("\\"), templates) else line for line in text.split("\n")
    )


def unescape(text: str, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """Inverse of `escape`."""
    return "\n".join(
        line[1:] if line.startswith("\\") and _kind(line.lstrip("\\"), templates) else line
        for line in text.split("\n")
    )


def render_thought(thought: RefinementThought, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """The thought as the text of one assistant turn (layout in the module docstring)."""
    if not isinstance(thought, RefinementThought):
        raise ValueError(f"render_thought: expected a RefinementThought, got {type(thought).__name__}")
    t = templates
    lines = [t.thought_open, t.draft_label, escape(thought.first_answer, t)]
    for criticism, improvement in thought.steps:
        lines += [t.review_label, escape(criticism, t), t.revision_label, escape(improvement, t)]
    lines += [
        t.review_label, escape(thought.failed_criticism, t), t.closing_line, t.thought_close,
        t.final_answer_prefix, escape(thought.final_answer, t),
    ]
    return "\n".join(lines)


def _delimiter(kinds: Sequence[str | None]) -> int | None:
    """Line index of the last final-answer delimiter outside an open thought."""
    inside, found = False, None
    for i, kind in enumerate(kinds):
        if kind == _OPEN:
            inside = True
        elif kind == _CLOSE:
            inside = False
        elif kind == _FINAL and not inside:
            found = i
    return found


def _answer_after(lines: list[str], i: int, t: PromptTemplates) -> str:
    line = lines[i]
    rest = line.lstrip()[len(t.final_answer_prefix):]
    text = "\n".join([rest, *lines[i + 1:]])
    for separator in ("\n", "\r\n", " "):  # what render writes first, so the round trip holds
        if text.startswith(separator):
            text = text[len(separator):]
            break
    return unescape(text, t)


def extract_final_answer(text: Any, templates: PromptTemplates = DEFAULT_TEMPLATES) -> str | None:
    """What the user is shown: the unescaped text after the last valid `Final answer:` delimiter
    (see the module docstring), or None when there is none or it is blank. Never raises."""
    if not isinstance(text, str):
        return None
    lines = text.split("\n")
    i = _delimiter([_kind(line, templates) for line in lines])
    if i is None:
        return None
    answer = _answer_after(lines, i, templates)
    return answer if answer.strip() else None


def parse_thought(text: Any, templates: PromptTemplates = DEFAULT_TEMPLATES) -> ParsedThought:
    """Parse a (possibly malformed or truncated) thought. Never raises: every deviation from the
    layout is reported in `problems`, and `well_formed` is True only when there is none."""
    if not isinstance(text, str):
        return ParsedThought(None, False, 0, [f"not a string: {type(text).__name__}"])
    t = templates
    lines = text.split("\n")
    kinds = [_kind(line, t) for line in lines]
    problems: list[str] = []

    delim = _delimiter(kinds)
    final: str | None = None
    if delim is None:
        problems.append("no final-answer delimiter after the thought")
        body = len(lines)
    else:
        answer = _answer_after(lines, delim, t)
        if answer.strip():
            final = answer
        else:
            problems.append("empty final answer")
        if any(kinds[delim + 1:]):
            problems.append("marker line after the final-answer delimiter")
        body = delim

    markers = [(i, kind) for i, kind in enumerate(kinds[:body]) if kind is not None]
    codes = "".join(kind for _, kind in markers)
    for code, name in ((_OPEN, "opening marker"), (_CLOSING, "closing line"), (_CLOSE, "closing marker")):
        count = codes.count(code)
        if count == 0:
            problems.append(f"missing {name}")
        elif count > 1:
            problems.append(f"repeated {name} ({count} times)")
    if _FINAL in codes:
        problems.append("final-answer delimiter inside the thought")
    if not _GRAMMAR.fullmatch(codes):
        problems.append(
            "sections out of order: expected opening marker, draft, (review, revision) per improving "
            "round, review, closing line, closing marker; found "
            + (", ".join(_NAMES[c] for c in codes) if codes else "none")
        )

    answers: list[str] = []
    criticisms: list[str] = []
    first = markers[0][0] if markers else body
    if any(line.strip() for line in lines[:first]):
        problems.append("text before the opening marker")
    ends = [i for i, _ in markers[1:]] + [body]
    for (start, kind), end in zip(markers, ends):
        content = lines[start + 1:end]
        if kind in (_DRAFT, _REVIEW, _REVISION):
            segment = unescape("\n".join(content), t)
            (criticisms if kind == _REVIEW else answers).append(segment)
            if not segment.strip():
                problems.append(f"empty section after the {_NAMES[kind]}")
        elif any(line.strip() for line in content):
            problems.append(f"unexpected text after the {_NAMES[kind]}")
    return ParsedThought(final, not problems, len(criticisms), problems, answers, criticisms)
