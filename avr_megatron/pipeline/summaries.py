"""The few figures the final table shows for each finished stage, read from what the stage
wrote (synthesis/pairs summary.json, train_summary.json, stored log-probs, eval results.json);
which of them a stage reports is its record's `summary` (avr_megatron.pipeline.graph)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avr_megatron.pipeline.stage_configs import StagePlan


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _synthesis(plan: StagePlan) -> dict[str, Any]:
    s = _json(Path(plan.cfg.synth.output_dir) / plan.stage.writes_pass / "summary.json").get("summary", {})
    out = {"prompts": s.get("prompts"), "trees": s.get("trees") or None,
           "thoughts": (s.get("events") or {}).get("thoughts_sampled")}
    gains = {r: s["gain_sum"][r] / c for r, c in s.get("gain_count", {}).items() if c}
    if gains:
        out["mean_gain_round1"] = round(gains.get("1", 0.0), 4)
    return {k: v for k, v in out.items() if v is not None}


def _pairs(plan: StagePlan) -> dict[str, Any]:
    # `avr pairs` saves its summary.json beside the datasets it writes.
    data = (Path(plan.cfg.synth.data_dir) / plan.stage.writes_datasets[0]).parent
    outputs = _json(data / "summary.json").get("outputs", {})
    return {f"{k}_rows": v.get("rows") for k, v in outputs.items()}


def _training(plan: StagePlan) -> dict[str, Any]:
    s = _json(Path(plan.cfg.run.dir) / "train_summary.json")
    last = s.get("last", {})
    out = {"iterations": s.get("iteration"), "loss": last.get("loss"),
           "accuracy": last.get("rewards/accuracies")}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items() if v is not None}


def _logps(plan: StagePlan) -> dict[str, Any]:
    ref = Path(str(plan.cfg.data.train) + ".ref_logps")
    try:
        import pyarrow.parquet as pq

        return {"pairs": pq.read_metadata(ref / "logps.parquet").num_rows}
    except (OSError, ImportError):
        return {}


def _eval(plan: StagePlan) -> dict[str, Any]:
    r = _json(Path(plan.cfg.eval.output_dir or Path(plan.cfg.run.dir) / "eval") / "results.json")
    table = r.get("table") or []
    if not table:
        return {}
    first, last = table[0], table[-1]

    def figure(row: dict, key: str, field: str):
        value = (row.get(key) or {}).get(field)
        return round(value, 4) if isinstance(value, float) else value

    return {"rounds": last.get("round"),
            "reward_r0": figure(first, "mean_reward", "mean"),
            f"reward_r{last.get('round')}": figure(last, "mean_reward", "mean"),
            "win_rate": figure(last, "win_rate", "rate"), "malformed": last.get("malformed")}


# A stage record's `summary` -> what reads its figures.
READERS = {"synthesis": _synthesis, "pairs": _pairs, "training": _training, "logps": _logps, "eval": _eval}


def stage_summary(plan: StagePlan) -> dict[str, Any]:
    return READERS[plan.stage.summary](plan) if plan.stage.summary else {}
