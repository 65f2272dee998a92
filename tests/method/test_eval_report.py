import json

import pytest

from avr_megatron.method.eval_report import (alpaca_records, instruction_of, markdown_table, round_summary,
                                             visible_answer)
from avr_megatron.method.prompts import PromptTemplates
from avr_megatron.method.thoughts import RefinementThought, render_thought

T = PromptTemplates()


def rec(pid, answer, reward, status="ok", **kw):
    return {"prompt_id": pid, "answer": answer, "reward": reward, "status": status, **kw}


def test_visible_answer_of_a_plain_model_is_the_text():
    assert visible_answer("hello", False, T) == {"answer": "hello", "final_answer_found": None, "well_formed": None}


def test_visible_answer_extracts_the_final_answer_and_flags_malformed_thoughts():
    thought = render_thought(RefinementThought("draft", (("too short", "longer answer"),), "fine now"), T)
    assert visible_answer(thought, True, T) == {"answer": "longer answer", "final_answer_found": True,
                                                "well_formed": True}
    # A final answer after a broken thought: shown, but counted as malformed.
    broken = "rambling\nFinal answer: 42"
    assert visible_answer(broken, True, T) == {"answer": "42", "final_answer_found": True, "well_formed": False}
    # No delimiter: the raw text is what the user sees (scored, exported, counted).
    assert visible_answer("no delimiter here", True, T) == {"answer": "no delimiter here",
                                                            "final_answer_found": False, "well_formed": False}


def test_round_summary_counts_and_win_rate():
    model = [rec("a", "x", 2.0), rec("b", "y", 0.0, final_answer_found=False, well_formed=False),
             rec("c", None, None, "no_answer"), rec("d", "z", 1.0, "kept", final_answer_found=True, well_formed=False)]
    base = [rec("a", "p", 1.0), rec("b", "q", 1.0), rec("c", "r", 0.0), rec("d", "s", 1.0)]
    s = round_summary(2, model, base, confidence=0.95, tie_margin=0.0)
    assert s["round"] == 2 and s["prompts"] == 4
    assert s["status"] == {"ok": 2, "no_answer": 1, "kept": 1}
    assert (s["no_final_answer"], s["malformed"]) == (1, 2)
    assert s["mean_reward"]["n"] == 3 and s["mean_reward"]["mean"] == pytest.approx(1.0)
    w = s["win_rate"]
    assert (w["wins"], w["ties"], w["losses"]) == (1, 1, 2)
    assert w["rate"] == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError, match="different prompts"):
        round_summary(0, model, base[::-1], confidence=0.95, tie_margin=0.0)
    table = markdown_table([s], round_summary(0, base, None, confidence=0.95, tie_margin=0.0), model="m",
                           baseline_name="b")
    assert "| 2 | +1.0000 |" in table and "37.5%" in table and "1/1/2" in table and "Baseline `b`" in table


def test_alpaca_records_follow_the_model_outputs_format():
    xs = [[{"role": "user", "content": "hi"}],
          [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}],
          [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    out = alpaca_records(xs, ["A", None, "C"], "gen")
    assert json.loads(json.dumps(out)) == [
        {"instruction": "hi", "output": "A", "generator": "gen"},
        {"instruction": "q", "output": "", "generator": "gen"},
        {"instruction": "User: a\n\nAssistant: b\n\nUser: c", "output": "C", "generator": "gen"},
    ]
    assert instruction_of(xs[1]) == "q"
    assert alpaca_records(xs[:1], ["A"], "gen", "mine")[0]["dataset"] == "mine"
    with pytest.raises(ValueError, match="3 prompts but 2"):
        alpaca_records(xs, ["A", "B"], "gen")
    with pytest.raises(ValueError, match="generator"):
        alpaca_records(xs[:1], ["A"], "")
