"""rewards_vs_rounds.png: mean reward (with its interval) per test-time refinement round, the
baseline's mean reward as a line, and, with a baseline, the win rate per round beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from avr_megatron.runtime.files import atomic_write_bytes


def _errors(stats: Sequence[Mapping[str, Any]], scale: float = 1.0) -> list[list[float]]:
    """[below, above] error-bar lengths from each interval (0 where there is none)."""
    below, above = [], []
    for s in stats:
        centre = s["mean"] if "mean" in s else s["rate"]
        below.append(0.0 if s["low"] is None else scale * (centre - s["low"]))
        above.append(0.0 if s["high"] is None else scale * (s["high"] - centre))
    return [below, above]


def plot_rewards(path: Path, summaries: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None,
                 generator: str, baseline_name: str | None) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [s["round"] for s in summaries]
    with_wr = baseline is not None and all(s["win_rate"] is not None for s in summaries)
    fig, axes = plt.subplots(1, 2 if with_wr else 1, figsize=(10 if with_wr else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    means = [s["mean_reward"] for s in summaries]
    shown = [(r, m) for r, m in zip(rounds, means) if m["mean"] is not None]
    if shown:
        ax.errorbar([r for r, _ in shown], [m["mean"] for _, m in shown], yerr=_errors([m for _, m in shown]),
                    marker="o", capsize=4, label=generator)
    if baseline is not None and baseline["mean_reward"]["mean"] is not None:
        ax.axhline(baseline["mean_reward"]["mean"], color="gray", linestyle="--",
                   label=f"baseline {baseline_name}")
    pct = int(round(100 * summaries[0]["mean_reward"]["confidence"])) if summaries else 95
    ax.set_xlabel("test-time refinement rounds")
    ax.set_ylabel(f"mean reward ({pct}% CI)")
    ax.set_xticks(rounds)
    ax.set_title("reward vs refinement rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if with_wr:
        ax2 = axes[0][1]
        wr = [s["win_rate"] for s in summaries]
        ax2.errorbar(rounds, [100 * w["rate"] for w in wr], yerr=_errors(wr, 100.0), marker="o", capsize=4,
                     color="tab:orange")
        ax2.axhline(50, color="gray", linestyle=":")
        ax2.set_ylim(0, 100)
        ax2.set_xticks(rounds)
        ax2.set_xlabel("test-time refinement rounds")
        ax2.set_ylabel(f"win rate vs {baseline_name} (%, {pct}% Wilson CI)")
        ax2.set_title("win rate vs rounds (ties count half)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
