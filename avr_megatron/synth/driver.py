"""The synthesis driver: one shard of one synthesis pass (stage1 | stage2 | thoughts), chunk by chunk.

Each chunk of `synth.chunk_size` prompts becomes one set of state machines, driven either
- without phase barriers (`synth.scheduling` async, the default with vllm / server engines):
  every request goes to the engine as soon as it is issued, `synth.chunks_in_flight` chunks at a
  time (avr_megatron.synth.scheduler); or
- by frontier batching (barrier, the transformers engine): every engine call carries the pending
  requests of all prompts of the chunk (criticisms of every prompt together, then every
  improvement, then every score; avr_megatron.method.frontier).
Both give the same rows. A finished chunk is written as one atomic file: killing the process
loses at most the chunks in flight; a rerun skips finished chunks (see avr_megatron.synth.store).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig
from avr_megatron.config.validate import check_stage2_start
from avr_megatron.method.frontier import run_frontier
from avr_megatron.method.summary import RunSummary
from avr_megatron.method.tree import Provenance
from avr_megatron.synth.card import write_output_card
from avr_megatron.synth.fallback import CriticismCounter
from avr_megatron.synth.inputs import InvalidRecord, PromptRecord, load_prompts
from avr_megatron.synth.lengths import PromptLengthCheck
from avr_megatron.synth.scheduler import Job, run_async
from avr_megatron.synth.passes import PASSES, SynthesisPass, sampling_of, templates_of, thought_sampling_of
from avr_megatron.runtime.files import atomic_write_json
from avr_megatron.synth.store import ShardStore, read_output

log = logging.getLogger(__name__)


def output_root(cfg: AvrConfig) -> Path:
    return Path(cfg.synth.output_dir or Path(cfg.run.dir) / "synth")


def pass_dir(cfg: AvrConfig, kind: str) -> Path:
    return output_root(cfg) / kind


def _items(kind: str, cfg: AvrConfig, shard: tuple[int, int]) -> dict[str, Any]:
    """This shard's work items, the invalid source records, and a description of the input."""
    if kind in ("stage1", "stage2"):
        lengths = PromptLengthCheck(cfg, sampling_of(cfg).max_tokens)
        if kind == "stage1":
            loaded = load_prompts(cfg.synth.input, shard, check=lengths)
            items = loaded.records
        else:  # the search starts from the source set's chosen answer (start=chosen) or a fresh sample
            check_stage2_start(cfg)  # before reading the input or loading a model

            def start_of(r: PromptRecord) -> PromptRecord:
                chosen = cfg.synth.stage2.start == "chosen" and r.chosen
                return replace(r, y0=r.chosen[-1]["content"] if chosen else None)

            lengths.answer_field = cfg.synth.input.fields.chosen  # the answer the reward model scores
            loaded = load_prompts(cfg.synth.input, shard, check=lambda r: lengths(start_of(r)))
            items = [replace(start_of(r), chosen=None) for r in loaded.records]
        fields = asdict(cfg.synth.input.fields)
        source = {"path": loaded.source, "fields": fields, "limit": cfg.synth.input.limit, "digest": loaded.digest,
                  "lengths": lengths.limits()}
        return {"items": items, "invalid": loaded.invalid, "rows_read": loaded.rows, "source": source}
    # thoughts: the prompts (and source rewards) of the finished stage-2 searches.
    src = pass_dir(cfg, "stage2")
    rows = read_output(src, what="stage-2 output (input of `avr synth thoughts`)")
    i, n = shard
    items = [PromptRecord(r["row"], r["prompt_id"], r["x"], source_reward=r["reward_y0"])
             for r in rows if r["status"] == "ok" and r["row"] % n == i]
    import hashlib

    digest = hashlib.sha256(json.dumps([[it.row, it.prompt_id, it.x, it.source_reward] for it in items]).encode())
    lengths = PromptLengthCheck(cfg, thought_sampling_of(cfg).max_tokens)
    invalid = [InvalidRecord(it.row, it.prompt_id, *problem) for it in items if (problem := lengths(it))]
    bad = {r.row for r in invalid}
    return {"items": [it for it in items if it.row not in bad], "invalid": invalid, "rows_read": len(rows),
            "source": {"path": str(src), "digest": digest.hexdigest(), "lengths": lengths.limits()}}


def _provenance(kind: str, cfg: AvrConfig, policy_name: str, reward_name: str) -> Provenance:
    sampling = thought_sampling_of(cfg) if kind == "thoughts" else sampling_of(cfg)
    return Provenance(policy_name, reward_name, sampling)


def _name(engine_cfg) -> str:
    return engine_cfg.name or engine_cfg.model or "?"


def run_pass(kind: str, cfg: AvrConfig, shard: tuple[int, int] = (0, 1), *, engines: tuple | None = None,
             out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) one shard of `kind`; returns the shard report (also saved and printed).
    `engines` = (chat, reward) overrides the engines the recipe names (benchmarks, tests)."""
    synthesis: SynthesisPass = PASSES[kind]
    s = cfg.synth
    for role in ("policy", "reward"):
        if engines is None and not getattr(s, role).model:
            raise ConfigError(f"synth.{role}.model is not set: `avr synth {kind}` needs a "
                              f"{'chat model' if role == 'policy' else 'reward model'}")
    work = _items(kind, cfg, shard)
    items: list[PromptRecord] = work["items"]
    out = Path(out_dir) if out_dir is not None else pass_dir(cfg, kind)
    store = ShardStore(out, kind=kind, shard=shard, fmt=s.output_format,
                       fingerprint={**synthesis.fingerprint(cfg), "source": work["source"]})
    store.open()
    size = s.chunk_size
    num_chunks = math.ceil(len(items) / size)
    done = {c for c in store.done_chunks() if c < num_chunks}
    invalid: list[InvalidRecord] = work["invalid"]
    manifest = dict(source=work["source"], rows_read=work["rows_read"], prompts=len(items), chunk_size=size,
                    chunks=num_chunks, invalid=[r.to_dict() for r in invalid])
    store.write_manifest(**manifest, done_chunks=len(done), complete=False)
    todo = [c for c in range(num_chunks) if c not in done]
    started = time.time()
    this_run: dict[str, Any] = {"chunks": len(todo), "prompts": 0, "engine_calls": 0}
    if todo:
        mode = scheduling_of(cfg, engines)
        chat, reward = engines if engines is not None else _build_engines(cfg, asynchronous=mode == "async")
        provenance = _provenance(kind, cfg, chat.name, reward.name)
        this_run["scheduling"] = mode
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=sum(len(items[c * size:(c + 1) * size]) for c in done),
                   unit="prompt", desc=f"synth {kind} {shard[0]}/{shard[1]}", disable=not s.progress or None)

        def job(c: int) -> Job:
            chunk = items[c * size:(c + 1) * size]
            counter = CriticismCounter(templates_of(cfg), s.rating_fallback, s.thoughts.answer_fallback)
            return Job(c, [synthesis.machine(item, provenance, cfg) for item in chunk], counter, context=chunk)

        def finish(j: Job) -> None:
            chunk, counter = j.context, j.postprocess
            rows = [synthesis.row(item, m, provenance, counter.samples[item.prompt_id], counter.fired[item.prompt_id])
                    for item, m in zip(chunk, j.machines)]
            store.write_chunk(j.key, rows, synthesis.schema())
            done.add(j.key)
            store.write_manifest(**manifest, done_chunks=len(done), complete=False)
            this_run["prompts"] += len(chunk)
            if s.thoughts.answer_fallback:
                this_run["thought_answer_fallback"] = (this_run.get("thought_answer_fallback", 0)
                                                       + sum(counter.thoughts_fired.values()))
            bar.update(len(chunk))

        try:
            if mode == "async":
                this_run["engine_calls"] = run_async((job(c) for c in todo), chat.submit, reward.submit,
                                                     on_done=finish, window=s.chunks_in_flight)
            else:
                for c in todo:
                    j = job(c)

                    def generate(requests, _post=j.postprocess):
                        return _post(requests, [list(texts) for texts in chat.generate(requests)])

                    this_run["engine_calls"] += run_frontier(j.machines, generate, reward.score)
                    finish(j)
                    bar.set_postfix(engine_calls=this_run["engine_calls"])
        finally:
            bar.close()
            if engines is None:
                chat.close()
                reward.close()
        this_run["engine_stats"] = {"policy": dict(getattr(chat, "stats", {})),
                                    "reward": dict(getattr(reward, "stats", {}))}
    this_run["seconds"] = round(time.time() - started, 3)
    summary = synthesis.summarize(store.shard_rows(), cfg)
    report = _report(kind, shard, cfg, summary, invalid, work, this_run)
    atomic_write_json(store.summary_path, report)
    store.write_manifest(**manifest, done_chunks=len(done), complete=True)
    merged = merge_summaries(out)
    if merged is not None:
        atomic_write_json(out / "summary.json", merged)
        write_output_card(out, merged, synthesis.schema().names)  # once every shard has finished
    print_report(report)
    return report


ASYNC_BACKENDS = ("vllm", "server")


def scheduling_of(cfg: AvrConfig, engines: tuple | None = None) -> str:
    """"async" (no phase barriers, avr_megatron.synth.scheduler) or "barrier" (frontier batching)
    for `synth.scheduling` and the engines in use: auto is async when both engines take single
    requests (vllm, server), else barrier."""
    want = cfg.synth.scheduling
    if engines is not None:
        able = all(callable(getattr(e, "submit", None)) for e in engines)
        where = "the engines given"
    else:
        able = cfg.synth.policy.backend in ASYNC_BACKENDS and cfg.synth.reward.backend in ASYNC_BACKENDS
        where = f"synth.policy.backend={cfg.synth.policy.backend}, synth.reward.backend={cfg.synth.reward.backend}"
    if want == "async" and not able:
        raise ConfigError(f"synth.scheduling=async needs engines that take single requests (backends "
                          f"{' or '.join(ASYNC_BACKENDS)} for both models); {where}")
    return "async" if want == "async" or (want == "auto" and able) else "barrier"


def _build_engines(cfg: AvrConfig, *, asynchronous: bool = False):
    from avr_megatron.engines.factory import build_chat_engine, build_reward_engine

    chat = build_chat_engine(cfg.synth.policy, cfg.run.seed, asynchronous=asynchronous)
    try:
        reward = build_reward_engine(cfg.synth.reward, cfg.run.seed, asynchronous=asynchronous)
    except BaseException:
        chat.close()
        raise
    return chat, reward


def _fallback_view(summary: RunSummary, enabled: bool) -> dict[str, Any]:
    fired = summary.events.get("rating_fallback", 0)
    samples = summary.events.get("criticism_samples", 0)
    return {"enabled": enabled, "fired": fired, "criticism_samples": samples,
            "rate": fired / samples if samples else None}


def _report(kind: str, shard: tuple[int, int], cfg: AvrConfig, summary: RunSummary, invalid: list[InvalidRecord],
            work: dict[str, Any], this_run: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind, "shard": f"{shard[0]}/{shard[1]}", "source": work["source"].get("path"),
        "rows_read": work["rows_read"],
        "invalid": {"count": len(invalid), "records": [r.to_dict() for r in invalid]},
        "rating_fallback": _fallback_view(summary, cfg.synth.rating_fallback),
        "summary": summary.to_dict(), "report": summary.report(), "this_run": this_run,
    }


def merge_summaries(out: Path) -> dict[str, Any] | None:
    """One summary over every shard summary present in `out` (None when there are none)."""
    paths = sorted(out.glob("summary-*-of-*.json"))
    if not paths:
        return None
    reports = [json.loads(p.read_text()) for p in paths]
    total = RunSummary()
    for r in reports:
        total = total.merge(RunSummary.from_dict(r["summary"]))
    invalid = [rec for r in reports for rec in r["invalid"]["records"]]
    num = int(reports[0]["shard"].split("/")[1])
    fallback = _fallback_view(total, any(r["rating_fallback"]["enabled"] for r in reports))
    return {"kind": reports[0]["kind"], "shards": [r["shard"] for r in reports], "num_shards": num,
            "complete": len(reports) == num, "rows_read": reports[0]["rows_read"],
            "invalid": {"count": len(invalid), "records": sorted(invalid, key=lambda d: d["row"])},
            "rating_fallback": fallback, "summary": total.to_dict(), "report": total.report()}


def print_report(report: dict[str, Any], file=None) -> None:
    """The end-of-run summary in a few readable lines."""
    import sys

    f = file or sys.stdout
    r = report["report"]
    w = f.write
    w(f"\n== {report['kind']} summary ({report.get('shard', 'all shards')}) ==\n")
    w(f"prompts: {r['prompts']}   trees/searches: {r['trees']}   failures: {r['failures'] or 'none'}\n")
    inv = report.get("invalid", {})
    if inv.get("count"):
        ids = ", ".join(f"row {d['row']}" + (f" ({d['id']})" if d.get("id") else "") for d in inv["records"][:10])
        more = f" and {inv['count'] - 10} more" if inv["count"] > 10 else ""
        w(f"invalid input records: {inv['count']}: {ids}{more}\n")
    fb = report.get("rating_fallback", {})
    if fb.get("enabled") or fb.get("fired"):
        rate = f"{100 * fb['rate']:.1f}%" if fb.get("rate") is not None else "n/a"
        w(f"rating_fallback fired: {fb['fired']} of {fb['criticism_samples']} criticism samples ({rate})\n")
    fired = (report.get("this_run") or {}).get("thought_answer_fallback")
    if fired:
        w(f"synth.thoughts.answer_fallback gave {fired} thought(s) of this run a final answer (test models only)\n")
    gains = r.get("mean_gain_by_round") or {}
    if gains:
        w("mean reward gain per round: " + "  ".join(f"r{k}: {v:+.4f}" for k, v in gains.items()) + "\n")
    for output, row in (r.get("acceptance") or {}).items():
        rate = f"{100 * row['rate']:.1f}%" if row["rate"] is not None else "n/a"
        rules = ", ".join(f"{k}={v}" for k, v in row["rejected"].items()) or "-"
        w(f"  {output:<12} accepted {row['accepted']:>6}  ({rate:>6})  rejected: {rules}\n")
    pairs = r.get("pairs_by_type") or {}
    rules = f" (stage-1 pair rules: {report['pair_rules']})" if report.get("pair_rules") else ""
    w("pairs by type: " + "  ".join(f"{k}={v}" for k, v in pairs.items()) + rules + "\n")
    duplicates = r.get("duplicates_removed") or {}
    if duplicates:
        w("duplicates removed: " + "  ".join(f"{k}={v}" for k, v in duplicates.items()) + "\n")
    events = {k: v for k, v in (r.get("events") or {}).items()}
    if events:
        w("events: " + "  ".join(f"{k}={v}" for k, v in events.items()) + "\n")
    f.flush()
