"""Loss curves of a training run, from its metrics.jsonl, to a PNG (headless: matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_metrics", "read_metrics"]


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of run_dir/metrics.jsonl; a line cut short by a kill is skipped."""
    train, evals = [], []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def plot_metrics(run_dir: str | Path) -> Path:
    """Write run_dir/loss.png: train loss and KD loss by step, held-out perplexity of every exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (objective)")
        if any(r.get("kd") for r in train):
            ax_loss.plot(steps, [r["kd"] for r in train], label="KD loss (final exit)")
        ax_loss.plot(steps, [r["ce"] for r in train], label="CE (final exit)", alpha=0.6)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training")
    ax_loss.legend()
    if evals:
        steps = [r["step"] for r in evals]
        num_exits = len(evals[-1]["exit_ppl"])
        for i in range(num_exits):
            ys = [r["exit_ppl"][i] if len(r["exit_ppl"]) == num_exits else float("nan") for r in evals]
            label = f"exit after loop {i + 1}" if num_exits > 1 else "held-out"
            ax_ppl.plot(steps, ys, marker="o", label=label)
        ax_ppl.set_yscale("log")
        ax_ppl.legend()
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_title("held-out perplexity")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
