"""The words the model sees: the criticise / improve instructions and the markers of the long
refinement thought. Our own wording; a recipe overrides any field through `from_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from avr_megatron.method.chat import Message, check_text, message, validate_conversation

CRITICISE = (
    "Now review the response you gave above to my request, as a demanding but fair expert would. "
    "Name its strengths and its weaknesses (correctness, helpfulness, relevance, depth, clarity, "
    "tone), and be specific about which parts you mean. End the review with an overall score from "
    "1 (very poor) to 10 (excellent) written in double square brackets, for example: Score: [[6]]"
)

IMPROVE = (
    "Using your review, write a better response to my original request: fix the weaknesses you "
    "found and keep what already works. Reply with the new response only, with no preamble and no "
    "remarks about what you changed."
)

# Fields that are whole lines of the long thought (a line equal to one of them is a marker).
LINE_MARKER_FIELDS = (
    "thought_open",
    "draft_label",
    "review_label",
    "revision_label",
    "closing_line",
    "thought_close",
)


@dataclass(frozen=True)
class PromptTemplates:
    criticise: str = CRITICISE
    improve: str = IMPROVE
    # The long refinement thought (stage 2), one assistant turn; see avr_megatron.method.thoughts.
    thought_open: str = "<refinement>"
    draft_label: str = "Draft answer:"
    review_label: str = "Review:"
    revision_label: str = "Revised answer:"
    closing_line: str = "Another revision would not make the answer better, so the refinement stops here."
    thought_close: str = "</refinement>"
    # Starts the line that introduces what the user is shown.
    final_answer_prefix: str = "Final answer:"

    def __post_init__(self) -> None:
        for f in fields(self):
            check_text(getattr(self, f.name), f"templates.{f.name}")
        markers = {name: getattr(self, name) for name in (*LINE_MARKER_FIELDS, "final_answer_prefix")}
        seen: dict[str, str] = {}
        for name, value in markers.items():
            where = f"templates.{name}"
            if "\n" in value or "\r" in value:
                raise ValueError(f"{where}: a thought marker must be a single line")
            if value != value.strip():
                raise ValueError(f"{where}: a thought marker must not start or end with whitespace")
            if value.startswith("\\"):
                raise ValueError(f"{where}: a thought marker must not start with a backslash (the escape character)")
            if value in seen:
                raise ValueError(f"{where}: same text as templates.{seen[value]}; thought markers must differ")
            seen[value] = name
        for name in LINE_MARKER_FIELDS:
            if getattr(self, name).startswith(self.final_answer_prefix):
                raise ValueError(f"templates.{name}: must not start with templates.final_answer_prefix")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "templates") -> PromptTemplates:
        """Defaults with the fields of `d` on top; unknown fields and non-strings raise ValueError."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key not in names:
                raise ValueError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
            if not isinstance(value, str):
                raise ValueError(f"{where}.{key}: expected a string, got {type(value).__name__}")
        try:
            return replace(cls(), **dict(d))
        except ValueError as e:
            raise ValueError(str(e).replace("templates.", f"{where}.", 1)) from None

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def line_markers(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in LINE_MARKER_FIELDS)

    def criticise_turns(self, x: Sequence[Message], y: str) -> list[Message]:
        """`[*x, assistant y, user <criticise>]`: the model's next turn is the criticism."""
        turns = validate_conversation(x, "x", last_role="user")
        return [*turns, message("assistant", check_text(y, "answer")), message("user", self.criticise)]

    def improve_turns(self, x: Sequence[Message], y: str, c: str) -> list[Message]:
        """`[*x, assistant y, user <criticise>, assistant c, user <improve>]`: next turn is y'."""
        return [
            *self.criticise_turns(x, y),
            message("assistant", check_text(c, "criticism")),
            message("user", self.improve),
        ]
