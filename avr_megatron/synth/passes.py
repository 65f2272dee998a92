"""The three synthesis passes as the driver sees them: what one prompt's state machine is, what
output row it leaves, and how stored rows turn into the method's records and run summary.

A pass is one `avr synth <kind>` run over the prompts (named "pass", not "stage": the pipeline's
stages are avr_megatron.pipeline.graph's, and "stage 1" / "stage 2" are the method's paper terms):

- stage1:   a stage-1 refinement tree per prompt (k criticisms x m improvements of y0, scored);
- stage2:   a multi-round refinement search per prompt (with the stage-1 model);
- thoughts: `synth.thoughts.num_samples` long thoughts per prompt sampled from the thought-SFT
  model, the final answer of each extracted and scored (prompts and source rewards come from the
  stage-2 output). A separate command because it needs a model trained on stage-2 data.

Rows keep the whole tree / search as JSON (Arrow has no recursive types) next to flat columns
for browsing; `build_stage1` / `build_stage2` (used by `avr pairs` and the end-of-run summary)
rebuild the method's objects from them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from avr_megatron.config.schema import AvrConfig
from avr_megatron.method.chat import Message, message
from avr_megatron.method.filters import FilterConfig
from avr_megatron.method.machine import RequestMachine
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.records import content_key, deduplicate, source_sft_record
from avr_megatron.method.requests import GenerateRequest, SamplingParams, ScoreRequest, make_key
from avr_megatron.method.search import RefinementSearch, SearchResult
from avr_megatron.method.stage1 import Stage1TreeBuilder, preference_pairs, rsft_example
from avr_megatron.method.stage2 import ThoughtSample, thought_pairs, thought_sft_example
from avr_megatron.method.summary import RunSummary
from avr_megatron.method.thoughts import extract_final_answer
from avr_megatron.method.tree import Provenance, RefinementTree, rewards_of
from avr_megatron.synth.inputs import PromptRecord


def templates_of(cfg: AvrConfig) -> PromptTemplates:
    return PromptTemplates.from_dict(dict(cfg.synth.templates), "synth.templates")


def filters_of(cfg: AvrConfig) -> FilterConfig:
    return FilterConfig.from_section(cfg.synth.filters, "synth.filters")


def sampling_of(cfg: AvrConfig) -> SamplingParams:
    return SamplingParams.from_section(cfg.synth.sampling, cfg.run.seed, "synth.sampling")


def thought_sampling_of(cfg: AvrConfig) -> SamplingParams:
    return SamplingParams.from_section(cfg.synth.thoughts, cfg.run.seed, "synth.thoughts")


def _messages_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _schema(columns: Sequence[tuple[str, Any]]):
    import pyarrow as pa

    return pa.schema(list(columns))


class SynthesisPass:
    """One kind of synthesis run: its fingerprint, row schema, per-prompt machine, row, summary."""

    kind: str

    def fingerprint(self, cfg: AvrConfig) -> dict[str, Any]:
        raise NotImplementedError

    def schema(self):
        raise NotImplementedError

    def machine(self, item: PromptRecord, provenance: Provenance, cfg: AvrConfig) -> RequestMachine:
        raise NotImplementedError

    def row(self, item: PromptRecord, machine: Any, provenance: Provenance, criticisms: int, fallbacks: int) -> dict[str, Any]:
        raise NotImplementedError

    def summarize(self, rows: Sequence[dict[str, Any]], cfg: AvrConfig) -> RunSummary:
        raise NotImplementedError


def _common_fingerprint(cfg: AvrConfig) -> dict[str, Any]:
    s = cfg.synth
    return {
        "policy": s.policy.name or s.policy.model, "reward": s.reward.name or s.reward.model,
        "seed": cfg.run.seed, "templates": templates_of(cfg).to_dict(), "chunk_size": s.chunk_size,
        "max_rating_tries": s.max_rating_tries, "max_answer_tries": s.max_answer_tries,
        "rating_fallback": s.rating_fallback, "rating_parse": s.rating_parse,
    }


def _base_row(item: PromptRecord, status: str, provenance: Provenance) -> dict[str, Any]:
    return {"prompt_id": item.prompt_id, "row": item.row, "status": status, "x": [dict(m) for m in item.x],
            "provenance": json.dumps(provenance.to_dict())}


def _add_event(summary: RunSummary, name: str, n: int) -> None:
    summary.events[name] = summary.events.get(name, 0) + int(n)


class Stage1TreesPass(SynthesisPass):
    kind = "stage1"

    def fingerprint(self, cfg: AvrConfig) -> dict[str, Any]:
        s = cfg.synth
        return {**_common_fingerprint(cfg), "sampling": sampling_of(cfg).to_dict(), "k": s.stage1.k, "m": s.stage1.m}

    def schema(self):
        import pyarrow as pa

        msgs = _messages_type()
        return _schema([
            ("prompt_id", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("x", msgs),
            ("y0", pa.string()), ("reward_y0", pa.float64()), ("best_reward", pa.float64()),
            ("num_improvements", pa.int64()), ("criticism_samples", pa.int64()), ("rating_fallbacks", pa.int64()),
            ("source_chosen", msgs), ("provenance", pa.string()), ("tree", pa.string()),
        ])

    def machine(self, item: PromptRecord, provenance: Provenance, cfg: AvrConfig) -> Stage1TreeBuilder:
        s = cfg.synth
        return Stage1TreeBuilder(item.prompt_id, item.x, item.y0, k=s.stage1.k, m=s.stage1.m, provenance=provenance,
                                 templates=templates_of(cfg), max_rating_tries=s.max_rating_tries,
                                 max_answer_tries=s.max_answer_tries, rating_parse=s.rating_parse)

    def row(self, item, machine, provenance, criticisms, fallbacks):
        row = _base_row(item, machine.failure or "ok", provenance)
        row.update(y0=None, reward_y0=None, best_reward=None, num_improvements=0, criticism_samples=criticisms,
                   rating_fallbacks=fallbacks, source_chosen=item.chosen, tree=None)
        if machine.failure is None:
            tree = machine.tree
            rewards = rewards_of(tree.root.children)
            row.update(y0=tree.root.answer, reward_y0=tree.root.reward, best_reward=max(rewards) if rewards else None,
                       num_improvements=len(rewards), tree=json.dumps(tree.to_dict(), ensure_ascii=False))
        return row

    def summarize(self, rows, cfg):
        return build_stage1(rows, cfg)[0]


class Stage2SearchPass(SynthesisPass):
    kind = "stage2"

    def fingerprint(self, cfg: AvrConfig) -> dict[str, Any]:
        s = cfg.synth.stage2
        return {**_common_fingerprint(cfg), "sampling": sampling_of(cfg).to_dict(), "k": s.k, "m": s.m,
                "max_rounds": s.max_rounds, "beam_width": s.beam_width, "start": s.start}

    def schema(self):
        import pyarrow as pa

        return _schema([
            ("prompt_id", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("x", _messages_type()),
            ("y0", pa.string()), ("reward_y0", pa.float64()), ("best_answer", pa.string()),
            ("best_reward", pa.float64()), ("num_rounds", pa.int64()), ("stop_reason", pa.string()),
            ("criticism_samples", pa.int64()), ("rating_fallbacks", pa.int64()), ("provenance", pa.string()),
            ("search", pa.string()),
        ])

    def machine(self, item: PromptRecord, provenance: Provenance, cfg: AvrConfig) -> RefinementSearch:
        s = cfg.synth
        return RefinementSearch(item.prompt_id, item.x, item.y0, k=s.stage2.k, m=s.stage2.m,
                                max_rounds=s.stage2.max_rounds, beam_width=s.stage2.beam_width, provenance=provenance,
                                templates=templates_of(cfg), max_rating_tries=s.max_rating_tries,
                                max_answer_tries=s.max_answer_tries, rating_parse=s.rating_parse)

    def row(self, item, machine, provenance, criticisms, fallbacks):
        row = _base_row(item, machine.failure or "ok", provenance)
        row.update(y0=None, reward_y0=None, best_answer=None, best_reward=None, num_rounds=0, stop_reason=None,
                   criticism_samples=criticisms, rating_fallbacks=fallbacks, search=None)
        if machine.failure is None:
            result: SearchResult = machine.result
            best = result.best
            row.update(y0=result.tree.root.answer, reward_y0=result.tree.root.reward, best_answer=best.answer,
                       best_reward=best.reward, num_rounds=len(result.rounds), stop_reason=result.stop_reason,
                       search=json.dumps(result.to_dict(), ensure_ascii=False))
        return row

    def summarize(self, rows, cfg):
        return build_stage2(rows, [], cfg)[0]


class ThoughtSampler(RequestMachine):
    """`n` thoughts for one prompt, then a reward for each final answer found in them."""

    def __init__(self, prompt_id: str, x: Sequence[Message], *, n: int, sampling: SamplingParams,
                 templates: PromptTemplates) -> None:
        super().__init__(f"prompt {prompt_id!r}")
        self.prompt_id, self.x, self.templates = prompt_id, [dict(m) for m in x], templates
        self.texts: list[str] | None = None
        self.finals: list[str | None] = []
        self.rewards: list[float | None] = []
        key = make_key(prompt_id, "s2", "thoughts")
        self._issue(GenerateRequest(key, self.x, n, sampling.for_key(key)), self._on_texts)

    @property
    def done(self) -> bool:
        return self.texts is not None and not self.pending()

    def _on_texts(self, texts: list[str]) -> None:
        self.texts = list(texts)
        self.rewards = [None] * len(texts)
        for j, text in enumerate(texts):
            final = extract_final_answer(text, self.templates)
            self.finals.append(final)
            if final is not None:
                key = make_key(self.prompt_id, "s2", "thoughts", f"y{j}", "score")
                request = ScoreRequest(key, [*(dict(m) for m in self.x), message("assistant", final)])
                self._issue(request, self._setter(j))

    def _setter(self, j: int) -> Callable[[float], None]:
        def set_reward(value: float) -> None:
            self.rewards[j] = value

        return set_reward


class ThoughtsPass(SynthesisPass):
    kind = "thoughts"

    def fingerprint(self, cfg: AvrConfig) -> dict[str, Any]:
        return {**_common_fingerprint(cfg), "sampling": thought_sampling_of(cfg).to_dict(),
                "num_samples": cfg.synth.thoughts.num_samples}

    def schema(self):
        import pyarrow as pa

        sample = pa.struct([("text", pa.string()), ("final_answer", pa.string()), ("reward", pa.float64())])
        return _schema([
            ("prompt_id", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("x", _messages_type()),
            ("source_reward", pa.float64()), ("samples", pa.list_(sample)), ("provenance", pa.string()),
        ])

    def machine(self, item: PromptRecord, provenance: Provenance, cfg: AvrConfig) -> ThoughtSampler:
        return ThoughtSampler(item.prompt_id, item.x, n=cfg.synth.thoughts.num_samples, sampling=provenance.sampling,
                              templates=templates_of(cfg))

    def row(self, item, machine, provenance, criticisms, fallbacks):
        row = _base_row(item, "ok", provenance)
        samples = [{"text": t, "final_answer": f, "reward": r}
                   for t, f, r in zip(machine.texts or [], machine.finals, machine.rewards)]
        row.update(source_reward=item.source_reward, samples=samples)
        return row

    def summarize(self, rows, cfg):
        return build_stage2([], rows, cfg)[0]


PASSES: dict[str, SynthesisPass] = {"stage1": Stage1TreesPass(), "stage2": Stage2SearchPass(),
                                    "thoughts": ThoughtsPass()}


def _conversation_key(messages: Sequence[Message]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def _count_duplicates(summary: RunSummary, output_of, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without later copies; each copy is counted as rejected "<output>:duplicate"."""
    kept, dropped = deduplicate(records)
    for record in dropped:
        summary.add_outcome(output_of(record), f"{output_of(record)}:duplicate")
    return kept


def build_stage1(rows: Sequence[dict[str, Any]], cfg: AvrConfig, *, mix_source_chosen: bool = False
                 ) -> tuple[RunSummary, list[dict[str, Any]], list[dict[str, Any]]]:
    """Stage-1 rows -> (summary, SFT records, preference pairs), under synth.pairs.gating.

    SFT records: the RSFT examples plus, with `mix_source_chosen`, every source chosen
    conversation that is not the (x, y0) of an RSFT example (the reference's RSFT data),
    de-duplicated and shuffled with run.seed. Pairs: de-duplicated over the whole output (every
    shard), first occurrence kept in row order. Copies are counted as "<output>:duplicate".
    """
    filters, gating = filters_of(cfg), cfg.synth.pairs.gating
    summary = RunSummary()
    summary.add_prompts(len(rows))
    rsft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    used_as_y0: set[str] = set()
    for row in rows:
        _add_event(summary, "criticism_samples", row.get("criticism_samples") or 0)
        _add_event(summary, "rating_fallback", row.get("rating_fallbacks") or 0)
        if mix_source_chosen and row.get("source_chosen"):
            sources.append(source_sft_record(row["prompt_id"], row["source_chosen"]))
        if row["status"] != "ok":
            summary.add_failure(row["status"])
            continue
        tree = RefinementTree.from_dict(json.loads(row["tree"]), f"stage-1 row {row['prompt_id']!r}.tree")
        summary.add_tree(tree)
        record, reason = rsft_example(tree, filters, gating)
        if record is None:
            summary.add_outcome("rsft", reason)
        else:
            rsft.append(record)
            used_as_y0.add(_conversation_key([*tree.x, message("assistant", tree.root.answer)]))
        accepted, reasons = preference_pairs(tree, filters, gating)
        summary.add_pairs([], reasons)
        pairs.extend(accepted)
    mixed = []
    for record in sources:
        if _conversation_key(record["messages"]) in used_as_y0:
            summary.add_outcome("source_chosen", "source_chosen:used_as_y0")
        else:
            mixed.append(record)
    def output_of(record: dict[str, Any]) -> str:
        return "rsft" if record["kind"] == "rsft" else "source_chosen"

    sft = _count_duplicates(summary, output_of, rsft + mixed)
    for record in sft:
        summary.add_outcome(output_of(record), None)
    random.Random(cfg.run.seed).shuffle(sft)
    pairs = _count_duplicates(summary, lambda r: r["pair_type"], pairs)
    summary.add_pairs(pairs, [])
    return summary, sft, pairs


def build_stage2(search_rows: Sequence[dict[str, Any]], thought_rows: Sequence[dict[str, Any]], cfg: AvrConfig
                 ) -> tuple[RunSummary, list[dict[str, Any]], list[dict[str, Any]]]:
    """Stage-2 search rows and thought-sample rows -> (summary, thought SFT records, thought
    pairs), each de-duplicated over the whole output (copies counted as "<output>:duplicate")."""
    templates = templates_of(cfg)
    filters = filters_of(cfg) if cfg.synth.filters.filter_thoughts else None
    y0_filter = filters_of(cfg) if cfg.synth.filters.thought_sft_y0 else None
    summary = RunSummary()
    summary.add_prompts(len(search_rows) if search_rows else len(thought_rows))
    sft: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for row in search_rows:
        _add_event(summary, "criticism_samples", row.get("criticism_samples") or 0)
        _add_event(summary, "rating_fallback", row.get("rating_fallbacks") or 0)
        if row["status"] != "ok":
            summary.add_failure(row["status"])
            continue
        result = SearchResult.from_dict(json.loads(row["search"]), f"stage-2 row {row['prompt_id']!r}.search")
        summary.add_search(result)
        record, reason = thought_sft_example(result, filters=filters, y0_filter=y0_filter)
        if record is None:
            summary.add_outcome("thought_sft", reason)
        else:
            sft.append(record)
    sft = _count_duplicates(summary, lambda r: "thought_sft", sft)
    for _ in sft:
        summary.add_outcome("thought_sft", None)
    seen: set[str] = set()
    for row in thought_rows:
        samples = [ThoughtSample(s["text"], s["reward"]) for s in row["samples"]]
        outcome = thought_pairs(
            samples, row["source_reward"], prompt_id=row["prompt_id"], x=row["x"],
            provenance=Provenance.from_dict(json.loads(row["provenance"])),
            length_control=cfg.synth.thoughts.length_control, templates=templates, filters=filters)
        if outcome.pair is not None:
            key = content_key(outcome.pair)
            if key in seen:
                outcome = replace(outcome, pair=None, reason="thought:duplicate")
            seen.add(key)
        summary.add_thought_pairs(outcome)
        if outcome.pair is not None:
            pairs.append(outcome.pair)
    return summary, sft, pairs
