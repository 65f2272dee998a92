"""What `avr eval` reports, as plain data: the answer the user is shown (the final answer of a long
thought), the per-round summary (mean reward, win rate against the baseline, counts), the
Markdown table of those summaries, and answers in AlpacaEval's `model_outputs` format.

Per-prompt answer records (one per prompt and round, in the answers files) hold:
`prompt_id`, `row`, `round`, `answer` (shown to the user, scored, exported; None when blank after
every try), `raw` (the generated text), `criticism` (rounds >= 1), `reward`, `status` (`ok`,
`no_answer`: blank after every try, `kept`: the round's criticism or improvement stayed blank, so
the previous answer stays, with its reward),
`final_answer_found` and `well_formed` (long-thought models; None otherwise), `tries`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from avr_megatron.method.chat import Message
from avr_megatron.method.eval_stats import mean_reward, win_rate
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.thoughts import parse_thought

STATUSES = ("ok", "no_answer", "kept")


def visible_answer(raw: str, long_thought: bool, templates: PromptTemplates) -> dict[str, Any]:
    """The answer shown to the user for a generated text (not blank).

    Long-thought models: the text after the last valid `Final answer:` delimiter. A thought
    without one (or with a blank one) has `final_answer_found=False` and its whole raw text is
    the answer (so it is still scored and exported, and counted); `well_formed` says whether the
    whole thought follows the layout (see avr_megatron.method.thoughts)."""
    if not long_thought:
        return {"answer": raw, "final_answer_found": None, "well_formed": None}
    parsed = parse_thought(raw, templates)
    found = parsed.final_answer is not None
    return {"answer": parsed.final_answer if found else raw, "final_answer_found": found,
            "well_formed": parsed.well_formed}


def _rewards(records: Sequence[Mapping[str, Any]]) -> list[float | None]:
    return [r["reward"] if r["answer"] is not None else None for r in records]


def round_summary(round_index: int, records: Sequence[Mapping[str, Any]],
                  baseline: Sequence[Mapping[str, Any]] | None, *, confidence: float,
                  tie_margin: float) -> dict[str, Any]:
    """Mean reward, win rate against the baseline (same prompt order) and counts of one round."""
    if baseline is not None:
        ids, base_ids = [r["prompt_id"] for r in records], [r["prompt_id"] for r in baseline]
        if ids != base_ids:
            raise ValueError(f"round {round_index}: model and baseline answers are for different prompts")
    statuses = {s: sum(1 for r in records if r["status"] == s) for s in STATUSES}
    rewards = _rewards(records)
    out: dict[str, Any] = {
        "round": round_index, "prompts": len(records),
        "mean_reward": mean_reward(rewards, confidence).to_dict(),
        "win_rate": None, "status": statuses,
        "no_final_answer": sum(1 for r in records if r.get("final_answer_found") is False),
        "malformed": sum(1 for r in records if r.get("well_formed") is False),
    }
    if baseline is not None:
        out["win_rate"] = win_rate(rewards, _rewards(baseline), tie_margin=tie_margin,
                                   confidence=confidence).to_dict()
    return out


def _num(x: float | None, fmt: str = "{:+.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def table_rows(summaries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the rewards-vs-rounds table (also what the terminal shows)."""
    if not summaries:
        return [], []
    pct = int(round(100 * summaries[0]["mean_reward"]["confidence"]))
    header = ["round", "mean reward", f"{pct}% CI", "win rate", f"{pct}% CI", "W/T/L", "no answer", "kept",
              "no final answer", "malformed"]
    rows = []
    for s in summaries:
        m, w = s["mean_reward"], s["win_rate"]
        ci = "n/a" if m["low"] is None else f"[{m['low']:+.4f}, {m['high']:+.4f}]"
        if w is None:
            wr, wci, wtl = "n/a", "n/a", "n/a"
        else:
            wr, wci = f"{100 * w['rate']:.1f}%", f"[{100 * w['low']:.1f}%, {100 * w['high']:.1f}%]"
            wtl = f"{w['wins']}/{w['ties']}/{w['losses']}"
        rows.append([str(s["round"]), _num(m["mean"]), ci, wr, wci, wtl, str(s["status"]["no_answer"]),
                     str(s["status"]["kept"]), str(s["no_final_answer"]), str(s["malformed"])])
    return header, rows


def markdown_table(summaries: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None = None,
                   *, model: str = "model", baseline_name: str = "baseline") -> str:
    """The table as Markdown, with the baseline's mean reward underneath."""
    header, rows = table_rows(summaries)
    lines = [f"# avr eval: {model}", "",
             "Round 0 is the first answer; round r is the answer after r criticise + improve steps.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if baseline is not None:
        m = baseline["mean_reward"]
        ci = "" if m["low"] is None else f" [{m['low']:+.4f}, {m['high']:+.4f}]"
        lines += ["", f"Baseline `{baseline_name}`: mean reward {_num(m['mean'])}{ci} over {m['n']} answers "
                  f"({baseline['status']['no_answer']} prompts without an answer)."]
    return "\n".join(lines) + "\n"


def instruction_of(x: Sequence[Message]) -> str:
    """AlpacaEval's `instruction`: the user's text for a one-turn prompt (a system message is left
    out); a multi-turn prompt as a transcript, `User: ...` / `Assistant: ...` blocks."""
    turns = [m for m in x if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def alpaca_records(prompts: Sequence[Sequence[Message]], answers: Sequence[str | None], generator: str,
                   dataset: str | None = None) -> list[dict[str, Any]]:
    """AlpacaEval `model_outputs`: one {"instruction", "output", "generator"[, "dataset"]} per
    prompt, in prompt order. A prompt without an answer gets an empty output (AlpacaEval's
    judge then prefers the reference), so the set stays complete."""
    if len(prompts) != len(answers):
        raise ValueError(f"alpaca_records: {len(prompts)} prompts but {len(answers)} answers")
    if not isinstance(generator, str) or not generator:
        raise ValueError(f"generator: expected a non-empty string, got {generator!r}")
    out = []
    for x, y in zip(prompts, answers):
        rec: dict[str, Any] = {"instruction": instruction_of(x), "output": y if y is not None else "",
                               "generator": generator}
        if dataset is not None:
            rec["dataset"] = dataset
        out.append(rec)
    return out
