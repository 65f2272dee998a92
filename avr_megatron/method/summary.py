"""Run counters the synthesis driver prints at the end: prompts, trees, acceptance per output and
per rejection rule, mean reward gain per round, pairs per type. Shards merge with `merge`; the
counters are plain ints and float sums, so `to_dict` is JSON-able and `from_dict` reads it back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from avr_megatron.method import _check
from avr_megatron.method.records import PAIR_TYPES
from avr_megatron.method.search import SearchResult
from avr_megatron.method.stage2 import ThoughtPairOutcome
from avr_megatron.method.tree import RefinementTree, rewards_of

_FIELDS = ("prompts", "trees", "failures", "accepted", "rejected", "events", "gain_sum", "gain_count")


def _add(into: dict[Any, Any], key: Any, n: Any = 1) -> None:
    into[key] = into.get(key, 0) + n


@dataclass
class RunSummary:
    prompts: int = 0
    # Finished stage-1 trees and stage-2 searches.
    trees: int = 0
    # Machines that gave up without a tree, by reason (e.g. "y0_blank").
    failures: dict[str, int] = field(default_factory=dict)
    # Accepted outputs: rsft, thought_sft, and one entry per pair type.
    accepted: dict[str, int] = field(default_factory=dict)
    # Rejections by "<output>:<rule>" (e.g. "rsft:length", "criticism:same_text").
    rejected: dict[str, int] = field(default_factory=dict)
    # criticism_resamples, criticisms_dropped, improvements_blank, search_stop:<reason>,
    # thoughts_sampled, thoughts_without_answer, thoughts_malformed.
    events: dict[str, int] = field(default_factory=dict)
    # Per round: sum and count of (best reward of the round - best reward before it).
    gain_sum: dict[int, float] = field(default_factory=dict)
    gain_count: dict[int, int] = field(default_factory=dict)

    def add_prompts(self, n: int = 1) -> None:
        self.prompts += _check.integer(n, "prompts", minimum=0)

    def add_failure(self, reason: str) -> None:
        _add(self.failures, _check.string(reason, "failure reason"))

    def _add_gain(self, round_no: int, gain: float) -> None:
        _add(self.gain_sum, round_no, gain)
        _add(self.gain_count, round_no)

    def _add_node_counters(self, tree: RefinementTree) -> None:
        for node in tree.nodes():
            for name, n in node.counters.items():
                _add(self.events, name, n)

    def add_tree(self, tree: RefinementTree) -> None:
        """A finished stage-1 tree: its discard counters and its round-1 gain."""
        self.trees += 1
        self._add_node_counters(tree)
        root = tree.root
        if root.children and root.reward is not None:
            self._add_gain(1, max(rewards_of(root.children)) - root.reward)

    def add_search(self, result: SearchResult) -> None:
        """A finished search: discard counters, per-round gains and why it stopped."""
        self.trees += 1
        self._add_node_counters(result.tree)
        for r in result.rounds:
            if r.best_reward is not None:
                self._add_gain(r.round, r.best_reward - r.previous_best)
        _add(self.events, f"search_stop:{result.stop_reason}")

    def add_outcome(self, output: str, reason: str | None) -> None:
        """One candidate output (e.g. "rsft"): accepted when `reason` is None."""
        if reason is None:
            _add(self.accepted, _check.string(output, "output"))
        else:
            _add(self.rejected, _check.string(reason, "reason"))

    def add_pairs(self, pairs: Iterable[Mapping[str, Any]], reasons: Iterable[str]) -> None:
        for pair in pairs:
            _add(self.accepted, pair["pair_type"])
        for reason in reasons:
            _add(self.rejected, _check.string(reason, "reason"))

    def add_thought_pairs(self, outcome: ThoughtPairOutcome) -> None:
        self.add_outcome("thought", outcome.reason)
        _add(self.events, "thoughts_sampled", outcome.n_samples)
        _add(self.events, "thoughts_without_answer", outcome.n_without_answer)
        _add(self.events, "thoughts_malformed", outcome.n_malformed)

    def merge(self, other: RunSummary) -> RunSummary:
        """A new summary holding both (shards of one run)."""
        out = RunSummary.from_dict(self.to_dict())
        out.prompts += other.prompts
        out.trees += other.trees
        for name in ("failures", "accepted", "rejected", "events", "gain_sum", "gain_count"):
            mine = getattr(out, name)
            for key, n in getattr(other, name).items():
                _add(mine, key, n)
        return out

    @property
    def pairs_by_type(self) -> dict[str, int]:
        return {t: self.accepted.get(t, 0) for t in PAIR_TYPES}

    @property
    def duplicates_removed(self) -> dict[str, int]:
        """Records dropped as copies of an earlier one, per output (rejections "<output>:duplicate")."""
        return {r.split(":", 1)[0]: n for r, n in sorted(self.rejected.items()) if r.endswith(":duplicate")}

    def mean_gain_by_round(self) -> dict[int, float]:
        return {r: self.gain_sum[r] / self.gain_count[r] for r in sorted(self.gain_count) if self.gain_count[r]}

    def acceptance(self) -> dict[str, dict[str, Any]]:
        """Per output: accepted, rejected by rule, and the accepted fraction."""
        outputs = set(self.accepted) | {reason.split(":", 1)[0] for reason in self.rejected}
        table = {}
        for output in sorted(outputs):
            rules = {r.split(":", 1)[1] if ":" in r else r: n for r, n in sorted(self.rejected.items()) if r.split(":", 1)[0] == output}
            accepted = self.accepted.get(output, 0)
            total = accepted + sum(rules.values())
            table[output] = {"accepted": accepted, "rejected": rules, "rate": accepted / total if total else None}
        return table

    def report(self) -> dict[str, Any]:
        """What a driver prints: the raw counters plus the derived views."""
        return {
            **self.to_dict(),
            "pairs_by_type": self.pairs_by_type,
            "duplicates_removed": self.duplicates_removed,
            "mean_gain_by_round": {str(r): g for r, g in self.mean_gain_by_round().items()},
            "acceptance": self.acceptance(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "trees": self.trees,
            "failures": dict(sorted(self.failures.items())),
            "accepted": dict(sorted(self.accepted.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "events": dict(sorted(self.events.items())),
            "gain_sum": {str(r): v for r, v in sorted(self.gain_sum.items())},
            "gain_count": {str(r): v for r, v in sorted(self.gain_count.items())},
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "summary") -> RunSummary:
        d = _check.mapping(d, where, _FIELDS)

        def rounds(name: str, number: bool) -> dict[int, Any]:
            value = d[name]
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{name}: expected a mapping round -> value")
            out = {}
            for key, v in value.items():
                if not isinstance(key, str) or not key.isdigit() or int(key) < 1:
                    raise ValueError(f"{where}.{name}: round key {key!r} is not a positive integer")
                at = f"{where}.{name}.{key}"
                out[int(key)] = _check.number(v, at) if number else _check.integer(v, at, minimum=0)
            return out

        return cls(
            prompts=_check.integer(d["prompts"], f"{where}.prompts", minimum=0),
            trees=_check.integer(d["trees"], f"{where}.trees", minimum=0),
            failures=_check.counters(d["failures"], f"{where}.failures"),
            accepted=_check.counters(d["accepted"], f"{where}.accepted"),
            rejected=_check.counters(d["rejected"], f"{where}.rejected"),
            events=_check.counters(d["events"], f"{where}.events"),
            gain_sum=rounds("gain_sum", True),
            gain_count=rounds("gain_count", False),
        )
