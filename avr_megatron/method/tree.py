"""The refinement tree: an answer, the criticisms of it, and the improvements each criticism led to,
with rewards and enough provenance to trace every text back to the request that produced it.

Criticisms are not separate nodes: each improvement carries the criticism that produced it
(text, rating, its index among the parent's criticisms), and the m siblings that share a
criticism share its index. `RefinementNode.criticism_groups` regroups them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from avr_megatron.method import _check
from avr_megatron.method.chat import Message, check_text, validate_conversation
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.rewards import check_reward
from avr_megatron.method.requests import SamplingParams

ROOT_ID = "y0"


@dataclass(frozen=True)
class Provenance:
    """Which models produced a tree and how they were sampled; copied into every record."""

    model: str
    reward_model: str
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        _check.string(self.model, "provenance.model")
        _check.string(self.reward_model, "provenance.reward_model")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError("provenance.sampling: expected SamplingParams")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "reward_model": self.reward_model, "sampling": self.sampling.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "provenance") -> Provenance:
        d = _check.mapping(d, where, ("model", "reward_model", "sampling"))
        return cls(
            _check.string(d["model"], f"{where}.model"),
            _check.string(d["reward_model"], f"{where}.reward_model"),
            SamplingParams.from_dict(d["sampling"], f"{where}.sampling"),
        )


@dataclass
class RefinementNode:
    """One answer. For an improvement, `criticism*` describe the criticism of the parent that it
    answers; for the root they are None."""

    id: str
    answer: str
    round: int = 0
    reward: float | None = None
    criticism: str | None = None
    rating: int | None = None
    # Position of the criticism among the parent's k criticism slots (0..k-1).
    criticism_index: int | None = None
    # Samples drawn for that criticism slot until one carried a rating (1..max_rating_tries).
    criticism_tries: int | None = None
    # Request key and sample index of the criticism and of the answer ("<key>#<j>"); None for
    # an answer given from a dataset.
    criticism_key: str | None = None
    sample_key: str | None = None
    children: list[RefinementNode] = field(default_factory=list)
    # What expanding this answer discarded: criticism_resamples, criticisms_dropped,
    # improvements_blank.
    counters: dict[str, int] = field(default_factory=dict)

    def walk(self) -> Iterator[RefinementNode]:
        """This node and its descendants, parents before children."""
        yield self
        for child in self.children:
            yield from child.walk()

    def criticism_groups(self) -> list[tuple[int, list[RefinementNode]]]:
        """Children grouped by the criticism they answer, ordered by criticism index."""
        groups: dict[int, list[RefinementNode]] = {}
        for child in self.children:
            if child.criticism_index is None:
                raise ValueError(f"node {child.id!r}: child without a criticism_index")
            groups.setdefault(child.criticism_index, []).append(child)
        return sorted(groups.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "answer": self.answer,
            "round": self.round,
            "reward": self.reward,
            "criticism": self.criticism,
            "rating": self.rating,
            "criticism_index": self.criticism_index,
            "criticism_tries": self.criticism_tries,
            "criticism_key": self.criticism_key,
            "sample_key": self.sample_key,
            "children": [c.to_dict() for c in self.children],
            "counters": dict(self.counters),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "node") -> RefinementNode:
        names = (
            "id", "answer", "round", "reward", "criticism", "rating", "criticism_index",
            "criticism_tries", "criticism_key", "sample_key", "children", "counters",
        )
        d = _check.mapping(d, where, names)
        crit = _check.optional_string(d["criticism"], f"{where}.criticism")
        node = cls(
            id=_check.string(d["id"], f"{where}.id"),
            answer=check_text(d["answer"], f"{where}.answer"),
            round=_check.integer(d["round"], f"{where}.round", minimum=0),
            reward=None if d["reward"] is None else check_reward(d["reward"], f"{where}.reward"),
            criticism=None if crit is None else check_text(crit, f"{where}.criticism"),
            rating=_rating(d["rating"], f"{where}.rating"),
            criticism_index=_check.optional_integer(d["criticism_index"], f"{where}.criticism_index", minimum=0),
            criticism_tries=_check.optional_integer(d["criticism_tries"], f"{where}.criticism_tries", minimum=1),
            criticism_key=_check.optional_string(d["criticism_key"], f"{where}.criticism_key"),
            sample_key=_check.optional_string(d["sample_key"], f"{where}.sample_key"),
            counters=_check.counters(d["counters"], f"{where}.counters"),
        )
        children = _check.sequence(d["children"], f"{where}.children")
        node.children = [cls.from_dict(c, f"{where}.children[{i}]") for i, c in enumerate(children)]
        return node


@dataclass
class RefinementTree:
    """All refinements of one prompt: the conversation `x`, the first answer (root), the
    criticise/improve expansions below it, and how they were produced."""

    prompt_id: str
    x: list[Message]
    root: RefinementNode
    provenance: Provenance
    templates: PromptTemplates = field(default_factory=PromptTemplates)
    # Criticisms per expanded answer, improvements per criticism.
    k: int = 2
    m: int = 2

    def __post_init__(self) -> None:
        _check.string(self.prompt_id, "tree.prompt_id")
        self.x = validate_conversation(self.x, f"tree {self.prompt_id!r}: x", last_role="user")
        _check.integer(self.k, "tree.k", minimum=1)
        _check.integer(self.m, "tree.m", minimum=1)

    def nodes(self) -> Iterator[RefinementNode]:
        return self.root.walk()

    def find(self, node_id: str) -> RefinementNode:
        for node in self.nodes():
            if node.id == node_id:
                return node
        raise ValueError(f"tree {self.prompt_id!r}: no node {node_id!r}")

    def lineage(self, node_id: str) -> list[RefinementNode]:
        """The answers from the root down to `node_id`, both included."""

        def path(node: RefinementNode) -> list[RefinementNode] | None:
            if node.id == node_id:
                return [node]
            for child in node.children:
                found = path(child)
                if found is not None:
                    return [node, *found]
            return None

        found = path(self.root)
        if found is None:
            raise ValueError(f"tree {self.prompt_id!r}: no node {node_id!r}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "x": [dict(m) for m in self.x],
            "root": self.root.to_dict(),
            "provenance": self.provenance.to_dict(),
            "templates": self.templates.to_dict(),
            "k": self.k,
            "m": self.m,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "tree") -> RefinementTree:
        d = _check.mapping(d, where, ("prompt_id", "x", "root", "provenance", "templates", "k", "m"))
        tree = cls(
            prompt_id=_check.string(d["prompt_id"], f"{where}.prompt_id"),
            x=validate_conversation(d["x"], f"{where}.x", last_role="user"),
            root=RefinementNode.from_dict(d["root"], f"{where}.root"),
            provenance=Provenance.from_dict(d["provenance"], f"{where}.provenance"),
            templates=PromptTemplates.from_dict(d["templates"], f"{where}.templates"),
            k=_check.integer(d["k"], f"{where}.k", minimum=1),
            m=_check.integer(d["m"], f"{where}.m", minimum=1),
        )
        ids = [n.id for n in tree.nodes()]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{where}: node id {dup!r} occurs more than once")
        return tree


def _rating(value: Any, where: str) -> int | None:
    rating = _check.optional_integer(value, where, minimum=1)
    if rating is not None and rating > 10:
        raise ValueError(f"{where}: a rating is 1..10, got {rating}")
    return rating


def scored_children(node: RefinementNode) -> list[RefinementNode]:
    """Children with a reward (all of them once a tree is complete)."""
    return [c for c in node.children if c.reward is not None]


def rewards_of(nodes: Sequence[RefinementNode]) -> list[float]:
    out = []
    for n in nodes:
        if n.reward is None:
            raise ValueError(f"node {n.id!r}: has no reward")
        out.append(n.reward)
    return out
