"""The eval driver with scripted engines: what each round holds, frontier batching, blank retries,
`kept` answers, long-thought counts, resume and the fingerprint guard."""

import json
from collections import Counter

import pytest

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.loader import load_config
from avr_megatron.evaluation.run import run_eval
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.requests import key_prompt_id
from avr_megatron.method.thoughts import RefinementThought, render_thought

T = PromptTemplates()
IDS = ["p0", "p1", "p2", "p3", "p4"]


class ScriptedChat:
    """First answer: `first` (or a per-prompt text); criticise: a fixed text; improve: the answer
    being refined + " more". `blank_first[pid]` = how many first tries come back blank;
    `blank_improve` = prompts whose improvements are always blank. Records every call."""

    def __init__(self, first="draft", per_prompt=None, blank_first=None, blank_improve=()):
        self.name = "scripted"
        self.first, self.per_prompt = first, per_prompt or {}
        self.blank_first, self.blank_improve = dict(blank_first or {}), set(blank_improve)
        self.calls: list[list[str]] = []
        self.seen = Counter()

    def generate(self, requests):
        self.calls.append([r.key for r in requests])
        out = []
        for r in requests:
            pid, last = key_prompt_id(r.key), r.messages[-1]["content"]
            if last == T.criticise:
                text = "needs more"
            elif last == T.improve:
                text = "" if pid in self.blank_improve else r.messages[-4]["content"] + " more"
            else:
                self.seen[pid] += 1
                text = "" if self.seen[pid] <= self.blank_first.get(pid, 0) else self.per_prompt.get(pid, self.first)
            out.append([text])
        return out

    def close(self):
        pass


class LengthReward:
    name = "length"

    def __init__(self):
        self.calls = []

    def score(self, requests):
        self.calls.append([r.key for r in requests])
        return [float(len(r.messages[-1]["content"])) for r in requests]

    def close(self):
        pass


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in IDS))
    return path


def cfg_for(tmp_path, prompts, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"eval.prompts={prompts}", "synth.input.fields.id=id",
                              "eval.model=m", "eval.baseline_model=b", "eval.progress=false", *extra])


def test_rounds_blank_retries_kept_answers_and_win_rates(tmp_path, prompts):
    model = ScriptedChat(blank_first={"p1": 1, "p2": 99}, blank_improve={"p3"})
    base = ScriptedChat(first="basex")
    reward = LengthReward()
    res = run_eval(cfg_for(tmp_path, prompts, "eval.rounds=2", "eval.max_answer_tries=3"),
                   engines={"model": model, "baseline": base, "reward": reward})
    out = tmp_path / "run" / "eval"

    # Frontier batching: each step's first call carries every prompt still in play.
    assert len(model.calls[0]) == 5 and [len(c) for c in model.calls[:3]] == [5, 2, 1]
    assert [len(c) for c in model.calls[3:]] == [4, 4, 1, 1, 4, 4, 1, 1]
    assert len(base.calls) == 1 and len(base.calls[0]) == 5

    rounds = [[json.loads(line) for line in (out / "answers" / f"round{r}.jsonl").read_text().splitlines()]
              for r in range(3)]
    r0, r1, r2 = rounds
    assert [row["answer"] for row in r0] == ["draft", "draft", None, "draft", "draft"]
    assert [row["tries"] for row in r0] == [1, 2, 3, 1, 1]
    assert [row["status"] for row in r2] == ["ok", "ok", "no_answer", "kept", "ok"]
    assert [row["answer"] for row in r2] == ["draft more more", "draft more more", None, "draft", "draft more more"]
    assert r1[0]["criticism"] == "needs more" and r0[0]["criticism"] is None

    # Independent expectation: reward = length; baseline "basex" (5) for every prompt.
    lengths = [[None if row["answer"] is None else len(row["answer"]) for row in rows] for rows in rounds]
    for r, summary in enumerate(res["table"]):
        present = [v for v in lengths[r] if v is not None]
        assert summary["mean_reward"]["mean"] == pytest.approx(sum(present) / len(present))
        wins = sum(v is not None and v > 5 for v in lengths[r])
        ties = sum(v == 5 for v in lengths[r])
        losses = sum(v is None or v < 5 for v in lengths[r])
        w = summary["win_rate"]
        assert (w["wins"], w["ties"], w["losses"]) == (wins, ties, losses)
        assert w["rate"] == pytest.approx((wins + ties / 2) / 5)
    assert [s["win_rate"]["rate"] for s in res["table"]] == pytest.approx([0.4, 0.7, 0.7])
    assert res["baseline"]["mean_reward"]["mean"] == 5.0
    assert [s["status"]["kept"] for s in res["table"]] == [0, 1, 1]
    assert res["table"][2]["status"]["no_answer"] == 1

    export = json.loads((out / "alpaca_eval" / "m_round2.json").read_text())
    assert [e["output"] for e in export] == ["draft more more", "draft more more", "", "draft", "draft more more"]
    assert {tuple(sorted(e)) for e in export} == {("generator", "instruction", "output")}
    assert export[0]["instruction"] == "question p0" and export[0]["generator"] == "m_round2"
    assert json.loads((out / "alpaca_eval" / "b.json").read_text())[0]["output"] == "basex"
    assert (out / "rewards_vs_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | +8.7500 |" in (out / "table.md").read_text()


def test_resume_runs_only_new_rounds_and_refuses_other_settings(tmp_path, prompts):
    engines = {"model": ScriptedChat(), "baseline": ScriptedChat(first="basex"), "reward": LengthReward()}
    run_eval(cfg_for(tmp_path, prompts, "eval.rounds=1"), engines=engines)
    out = tmp_path / "run" / "eval" / "answers"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = {"model": ScriptedChat(), "baseline": ScriptedChat(first="other"), "reward": LengthReward()}
    res = run_eval(cfg_for(tmp_path, prompts, "eval.rounds=2"), engines=again)
    assert again["baseline"].calls == []
    keys = [k for call in again["model"].calls for k in call]
    assert keys and all("/r2/" in k for k in keys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert len(res["table"]) == 3 and res["table"][2]["mean_reward"]["mean"] == len("draft more more")

    # Nothing to do: reports are rebuilt from the files without calling any engine.
    idle = {"model": ScriptedChat(), "baseline": ScriptedChat(), "reward": LengthReward()}
    assert run_eval(cfg_for(tmp_path, prompts, "eval.rounds=2"), engines=idle)["table"] == res["table"]
    assert idle["model"].calls == [] and idle["reward"].calls == []

    # Fewer rounds: reported from the cached files; the longer run's export is not left behind.
    fewer = run_eval(cfg_for(tmp_path, prompts, "eval.rounds=1"), engines=idle)
    assert fewer["table"] == res["table"][:2] and idle["model"].calls == []
    exports = tmp_path / "run" / "eval" / "alpaca_eval"
    assert sorted(p.name for p in exports.iterdir()) == ["b.json", "m_round0.json", "m_round1.json"]
    assert (out / "round2.jsonl").exists()

    with pytest.raises(ConfigError, match="differs in: sampling"):
        run_eval(cfg_for(tmp_path, prompts, "eval.rounds=2", "eval.sampling.temperature=0.3"), engines=idle)


def test_long_thought_answers_are_extracted_and_malformed_counted(tmp_path, prompts):
    good = render_thought(RefinementThought("a", (("c", "the best"),), "ok"), T)
    model = ScriptedChat(per_prompt={"p0": good, "p1": "chatter\nFinal answer: short", "p2": "no delimiter"},
                         first=good)
    res = run_eval(cfg_for(tmp_path, prompts, "eval.long_thought=true", "eval.rounds=1"),
                   engines={"model": model, "baseline": ScriptedChat(first="basex"), "reward": LengthReward()})
    r0 = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers" / "round0.jsonl").read_text().splitlines()]
    assert [row["answer"] for row in r0] == ["the best", "short", "no delimiter", "the best", "the best"]
    assert r0[0]["raw"] == good
    assert (res["table"][0]["no_final_answer"], res["table"][0]["malformed"]) == (1, 2)
    # Refinement criticises what the user saw (the final answer), not the whole thought.
    r1 = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers" / "round1.jsonl").read_text().splitlines()]
    assert r1[0]["answer"] == "the best more" and r1[2]["answer"] == "no delimiter more"
    assert res["table"][1]["no_final_answer"] == 5
