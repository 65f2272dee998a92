"""`avr eval`: answers of a model on a prompt set, optionally refined at test time (criticise +
improve, R rounds), scored with the reward model and compared with a baseline model's answers.

Every engine call is frontier-batched: all prompts of one step (baseline answers, first answers,
the criticisms of a round, its improvements, its scores) go to the engine together. Each finished
round is written atomically to `answers/round<r>.jsonl` (the baseline's to `answers/baseline.jsonl`)
beside a manifest holding the run's fingerprint; a rerun with the same settings reuses finished
rounds (so raising eval.rounds only runs the new ones), and a rerun with different settings into
the same directory is refused rather than mixing answers. Reports (results.json, table.md,
rewards_vs_rounds.png, alpaca_eval/*.json) are rebuilt from the answer files at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig, SynthEngineConfig
from avr_megatron.method.eval_report import (alpaca_records, markdown_table, round_summary, table_rows,
                                             visible_answer)
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import (GenerateRequest, SamplingParams, ScoreRequest, check_result,
                                          make_key)
from avr_megatron.synth.inputs import LoadedInput, PromptRecord, load_prompts
from avr_megatron.runtime.files import atomic_write_bytes, atomic_write_json
from avr_megatron.synth.store import fingerprint_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def output_dir(cfg: AvrConfig) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.run.dir) / "eval")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def generator_names(cfg: AvrConfig) -> tuple[str, str | None]:
    e = cfg.eval
    model = e.generator or Path(str(e.model).rstrip("/")).name or str(e.model)
    base = None
    if e.baseline_model:
        base = e.baseline_generator or Path(e.baseline_model.rstrip("/")).name or e.baseline_model
        if base == model:
            base = f"{base}-baseline"
    return model, base


def _check_model(value: str | None, key: str, backend: str) -> None:
    """A model named by path must exist (a hub name is left to the engine, unless offline)."""
    if not value:
        raise ConfigError(f"{key} is not set: give the Hugging Face directory of the model "
                          f"(e.g. {key}=path/to/model)")
    if backend == "server" or Path(value).exists():
        return
    looks_like_path = value.startswith(("/", ".", "~")) or value.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_like_path or offline:
        raise ConfigError(f"{key}={value!r}: no such model directory")


def _prompts(cfg: AvrConfig) -> LoadedInput:
    e = cfg.eval
    inp = dataclasses.replace(cfg.synth.input, path=e.prompts or cfg.synth.input.path,
                              limit=e.limit if e.limit is not None else cfg.synth.input.limit)
    try:
        loaded = load_prompts(inp)
    except ConfigError as exc:
        if e.prompts:
            raise ConfigError(str(exc).replace("synth.input.path", "eval.prompts")) from None
        raise
    if not loaded.records:
        where = "eval.prompts" if e.prompts else "synth.input.path"
        raise ConfigError(f"{where}={inp.path!r}: no valid prompts ({len(loaded.invalid)} invalid rows; "
                          f"first: {loaded.invalid[0].to_dict() if loaded.invalid else 'none'})")
    return loaded


def _sampling(cfg: AvrConfig) -> SamplingParams:
    return SamplingParams.from_section(cfg.eval.sampling, cfg.run.seed, "eval.sampling")


def _templates(cfg: AvrConfig) -> PromptTemplates:
    return PromptTemplates.from_dict(dict(cfg.synth.templates), "synth.templates")


def fingerprint(cfg: AvrConfig, loaded: LoadedInput) -> dict[str, Any]:
    """Everything that changes what an answer file holds."""
    e, s = cfg.eval, cfg.synth
    return {
        "model": e.model, "baseline_model": e.baseline_model, "long_thought": e.long_thought,
        "policy_backend": s.policy.backend, "reward_model": s.reward.model, "reward_backend": s.reward.backend,
        "sampling": _sampling(cfg).to_dict(), "max_answer_tries": e.max_answer_tries,
        "templates": _templates(cfg).to_dict(), "prompts": loaded.digest,
    }


class AnswerStore:
    """The answer files of one eval output directory, guarded by the run's fingerprint."""

    def __init__(self, out: Path, fp: dict[str, Any], prompt_ids: list[str]) -> None:
        self.out, self.fp, self.ids = out, fp, prompt_ids
        self.answers = out / "answers"

    def open(self) -> None:
        path = self.out / MANIFEST
        if path.exists():
            theirs = json.loads(path.read_text()).get("fingerprint", {})
            if theirs != self.fp:
                keys = ", ".join(sorted(k for k in set(theirs) | set(self.fp) if theirs.get(k) != self.fp.get(k)))
                raise ConfigError(f"{self.out}: holds answers of an eval with different settings (differs in: {keys}). "
                                  "Set eval.output_dir (or run.dir) to a new directory, or delete the old one.")
        self.answers.mkdir(parents=True, exist_ok=True)
        for tmp in self.answers.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        atomic_write_json(path, {"fingerprint": self.fp, "fingerprint_sha256": fingerprint_digest(self.fp)})

    def path(self, name: str) -> Path:
        return self.answers / f"{name}.jsonl"

    def load(self, name: str) -> list[dict[str, Any]] | None:
        path = self.path(name)
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if [r["prompt_id"] for r in rows] != self.ids:
            log.warning("%s does not match the prompt set; regenerating it", path)
            return None
        return rows

    def save(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        atomic_write_bytes(self.path(name), data)


class Evaluator:
    """Drives the engines through the rounds of one eval (frontier batches, blank retries)."""

    def __init__(self, cfg: AvrConfig, records: list[PromptRecord], reward, bar=None) -> None:
        self.cfg, self.records, self.reward, self.bar = cfg, records, reward, bar
        self.sampling = _sampling(cfg)
        self.templates = _templates(cfg)
        self.tries = cfg.eval.max_answer_tries

    def _step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def _done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def generate(self, engine, slots: list[tuple[int, str, list]], what: str) -> dict[int, tuple[str | None, int]]:
        """slot index -> (first non-blank sample or None, tries used); one engine call per try."""
        self._step(what)
        out: dict[int, tuple[str | None, int]] = {}
        pending = list(slots)
        for t in range(self.tries):
            if not pending:
                break
            requests = []
            for _, key, messages in pending:
                k = f"{key}/t{t}"
                requests.append(GenerateRequest(k, messages, 1, self.sampling.for_key(k)))
            results = engine.generate(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"{what}: engine returned {len(results)} results for {len(requests)} requests")
            retry = []
            for slot, request, result in zip(pending, requests, results):
                text = check_result(request, result)[0]
                if text.strip():
                    out[slot[0]] = (text, t + 1)
                else:
                    out[slot[0]] = (None, t + 1)
                    retry.append(slot)
            pending = retry
        self._done()
        return out

    def score(self, side: str, round_index: int, rows: list[dict[str, Any]], which: list[int]) -> None:
        self._step(f"{side} r{round_index}: score")
        requests = [ScoreRequest(make_key(rows[i]["prompt_id"], side, f"r{round_index}", "score"),
                                 [*self.records[i].x, {"role": "assistant", "content": rows[i]["answer"]}])
                    for i in which]
        if requests:
            rewards = self.reward.score(requests)
            if len(rewards) != len(requests):
                raise RuntimeError(f"reward engine returned {len(rewards)} scores for {len(requests)} requests")
            for i, request, value in zip(which, requests, rewards):
                rows[i]["reward"] = check_result(request, value)
        self._done()

    def _row(self, i: int, round_index: int, raw: str | None, tries: int, long_thought: bool) -> dict[str, Any]:
        rec = self.records[i]
        row = {"prompt_id": rec.prompt_id, "row": rec.row, "round": round_index, "answer": None, "raw": raw,
               "criticism": None, "reward": None, "status": "no_answer", "final_answer_found": None,
               "well_formed": None, "tries": tries}
        if raw is not None:
            row.update(visible_answer(raw, long_thought, self.templates), status="ok")
        return row

    def first_answers(self, engine, side: str, long_thought: bool) -> list[dict[str, Any]]:
        slots = [(i, make_key(r.prompt_id, side, "r0", "answer"), r.x) for i, r in enumerate(self.records)]
        got = self.generate(engine, slots, f"{side} r0: answer")
        rows = [self._row(i, 0, *got[i], long_thought) for i in range(len(self.records))]
        self.score(side, 0, rows, [i for i, row in enumerate(rows) if row["answer"] is not None])
        return rows

    def refine(self, engine, previous: list[dict[str, Any]], round_index: int) -> list[dict[str, Any]]:
        """One test-time round: criticise each current answer, improve it, score the new answers.
        A prompt whose criticism or improvement stays blank keeps its previous answer (`kept`)."""
        lt, r = self.cfg.eval.long_thought, f"r{round_index}"
        live = [i for i, row in enumerate(previous) if row["answer"] is not None]
        slots = [(i, make_key(self.records[i].prompt_id, "model", r, "criticise"),
                  self.templates.criticise_turns(self.records[i].x, previous[i]["answer"])) for i in live]
        criticisms = self.generate(engine, slots, f"model {r}: criticise")
        with_c = [i for i in live if criticisms[i][0] is not None]
        slots = [(i, make_key(self.records[i].prompt_id, "model", r, "improve"),
                  self.templates.improve_turns(self.records[i].x, previous[i]["answer"], criticisms[i][0]))
                 for i in with_c]
        improved = self.generate(engine, slots, f"model {r}: improve")
        rows: list[dict[str, Any]] = []
        for i, prev in enumerate(previous):
            if i not in criticisms:  # no answer to refine
                rows.append(self._row(i, round_index, None, 0, lt))
                continue
            criticism, c_tries = criticisms[i]
            raw, y_tries = improved.get(i, (None, 0))
            if raw is None:
                row = {**prev, "round": round_index, "criticism": criticism, "status": "kept",
                       "tries": c_tries + y_tries}
            else:
                row = self._row(i, round_index, raw, c_tries + y_tries, lt)
                row["criticism"] = criticism
            rows.append(row)
        self.score("model", round_index, rows, [i for i, row in enumerate(rows) if row["status"] == "ok"])
        return rows


def _engine_cfg(base: SynthEngineConfig, model: str) -> SynthEngineConfig:
    return dataclasses.replace(base, model=model, name=None)


def run_eval(cfg: AvrConfig, *, engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) `avr eval`; returns results.json's content. `engines` ({"model", "baseline",
    "reward"}) replaces the engines the recipe names (tests, benchmarks)."""
    e = cfg.eval
    if engines is None:
        _check_model(e.model, "eval.model", cfg.synth.policy.backend)
        if e.baseline_model:
            _check_model(e.baseline_model, "eval.baseline_model", cfg.synth.policy.backend)
        _check_model(cfg.synth.reward.model, "synth.reward.model", cfg.synth.reward.backend)
    elif not e.model:
        raise ConfigError("eval.model is not set")
    loaded = _prompts(cfg)
    records = loaded.records
    out = output_dir(cfg)
    store = AnswerStore(out, fingerprint(cfg, loaded), [r.prompt_id for r in records])
    store.open()
    generator, base_generator = generator_names(cfg)

    baseline = store.load("baseline") if e.baseline_model else None
    rounds: list[list[dict[str, Any]]] = []
    for r in range(e.rounds + 1):
        rows = store.load(f"round{r}")
        if rows is None:
            break
        rounds.append(rows)
    need_baseline = bool(e.baseline_model) and baseline is None
    todo = e.rounds + 1 - len(rounds)
    # Progress: 2 steps (generate, score) per first answer, 3 per refinement round.
    steps = 2 * need_baseline + (2 + 3 * e.rounds if not rounds else 3 * todo)

    own = engines is None
    if todo or need_baseline:
        from tqdm.auto import tqdm

        from avr_megatron.engines.factory import build_chat_engine, build_reward_engine

        reward = engines["reward"] if engines else build_reward_engine(cfg.synth.reward, cfg.run.seed)
        bar = tqdm(total=steps, unit="step", desc=f"eval {generator}", disable=not e.progress or None)
        try:
            ev = Evaluator(cfg, records, reward, bar)
            if need_baseline:
                chat = engines["baseline"] if engines else build_chat_engine(
                    _engine_cfg(cfg.synth.policy, e.baseline_model), cfg.run.seed, "synth.policy")
                try:
                    baseline = ev.first_answers(chat, "baseline", long_thought=False)
                finally:
                    if own:
                        chat.close()
                store.save("baseline", baseline)
            if todo:
                chat = engines["model"] if engines else build_chat_engine(
                    _engine_cfg(cfg.synth.policy, e.model), cfg.run.seed, "synth.policy")
                try:
                    if not rounds:
                        rounds.append(ev.first_answers(chat, "model", long_thought=e.long_thought))
                        store.save("round0", rounds[0])
                    while len(rounds) <= e.rounds:
                        rows = ev.refine(chat, rounds[-1], len(rounds))
                        store.save(f"round{len(rounds)}", rows)
                        rounds.append(rows)
                finally:
                    if own:
                        chat.close()
        finally:
            bar.close()
            if own:
                reward.close()
    return write_reports(cfg, out, records, rounds, baseline, loaded, generator, base_generator)


def write_reports(cfg: AvrConfig, out: Path, records: list[PromptRecord], rounds: list[list[dict[str, Any]]],
                  baseline: list[dict[str, Any]] | None, loaded: LoadedInput, generator: str,
                  base_generator: str | None) -> dict[str, Any]:
    e = cfg.eval
    summaries = [round_summary(r, rows, baseline, confidence=e.confidence, tie_margin=e.tie_margin)
                 for r, rows in enumerate(rounds)]
    base_summary = (round_summary(0, baseline, None, confidence=e.confidence, tie_margin=e.tie_margin)
                    if baseline is not None else None)
    files: dict[str, Any] = {"answers": {f"round{r}": str(Path("answers") / f"round{r}.jsonl") for r in range(len(rounds))}}
    xs = [r.x for r in records]
    exports = {}
    for r, rows in enumerate(rounds):
        name = Path("alpaca_eval") / f"{_safe_name(generator)}_round{r}.json"
        recs = alpaca_records(xs, [row["answer"] for row in rows], f"{generator}_round{r}" if r else generator,
                              e.export_dataset)
        atomic_write_json(out / name, recs)
        exports[f"round{r}"] = str(name)
    if baseline is not None:
        files["answers"]["baseline"] = str(Path("answers") / "baseline.jsonl")
        name = Path("alpaca_eval") / f"{_safe_name(base_generator or 'baseline')}.json"
        atomic_write_json(out / name, alpaca_records(xs, [row["answer"] for row in baseline],
                                                     base_generator or "baseline", e.export_dataset))
        exports["baseline"] = str(name)
    files["alpaca_eval"] = exports
    # Exports of rounds beyond eval.rounds (an earlier, longer run) would read as current results.
    for stale in (out / "alpaca_eval").glob(f"{_safe_name(generator)}_round*.json"):
        if str(Path("alpaca_eval") / stale.name) not in exports.values():
            stale.unlink()
    table = markdown_table(summaries, base_summary, model=generator, baseline_name=base_generator or "baseline")
    atomic_write_bytes(out / "table.md", table.encode())
    files["table"] = "table.md"
    from avr_megatron.evaluation.plot import plot_rewards

    plot_rewards(out / "rewards_vs_rounds.png", summaries, base_summary, generator, base_generator)
    files["plot"] = "rewards_vs_rounds.png"
    results = {
        "model": e.model, "generator": generator, "baseline_model": e.baseline_model,
        "baseline_generator": base_generator, "long_thought": e.long_thought, "rounds": len(rounds) - 1,
        "prompts": {"source": loaded.source, "rows_read": loaded.rows, "valid": len(records),
                    "invalid": [r.to_dict() for r in loaded.invalid]},
        "reward_model": cfg.synth.reward.model, "confidence": e.confidence, "tie_margin": e.tie_margin,
        "sampling": _sampling(cfg).to_dict(),
        "table": summaries, "baseline": base_summary, "files": files,
    }
    atomic_write_json(out / "results.json", results)
    print_table(summaries, base_summary, generator, base_generator, out)
    return results


def print_table(summaries, base_summary, generator: str, base_generator: str | None, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(summaries)
    table = Table(title=f"avr eval: {generator}" + (f" vs {base_generator}" if base_generator else ""))
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the whole table
        console = Console(width=160)
    console.print(table)
    if base_summary is not None:
        m = base_summary["mean_reward"]
        mean = "n/a" if m["mean"] is None else f"{m['mean']:+.4f}"
        console.print(f"baseline {base_generator}: mean reward {mean} over {m['n']} answers")
    console.print(f"outputs in {out} (results.json, table.md, rewards_vs_rounds.png, alpaca_eval/)")
