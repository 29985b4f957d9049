"""What a training run measures and keeps: held-out perplexity of every exit, the metrics.jsonl log
(one JSON record per line) and its loss curves as a PNG (headless: matplotlib Agg)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import TrainConfig

__all__ = ["MetricsLog", "evaluate", "format_ppl", "plot_metrics", "read_metrics"]


@torch.no_grad()
def evaluate(model, heldout, cfg: TrainConfig, accelerator, micro: int) -> dict:
    """Held-out CE/perplexity of every exit over the first eval_tokens, sharded over ranks."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = min(len(heldout), max(1, cfg.eval_tokens // cfg.seq_len))
    # Same sequences whatever the world size; ranks get equal numbers of forwards (FSDP needs that),
    # a rank whose share ran out evaluates sequence 0 with weight 0.
    padded = -(-n // world) * world
    mine = list(range(rank, padded, world))
    sums, count = None, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), micro):
        rows = [j for j in mine[i:i + micro] if j < n]
        ids = torch.stack([heldout[j]["input_ids"] for j in rows or [0]]).to(accelerator.device)
        out = model(ids, eval_exits=True)
        labels = len(rows) * (ids.shape[1] - 1)
        s = out["exit_ce"].float() * labels
        sums = s if sums is None else sums + s
        count += labels
    model.train(was_training)
    totals = accelerator.reduce(torch.cat([sums, torch.tensor([float(count)], device=sums.device)]), "sum")
    exit_loss = (totals[:-1] / totals[-1]).tolist()
    return {
        "loss": exit_loss[-1],
        "ppl": math.exp(min(exit_loss[-1], 700)),
        "exit_loss": exit_loss,
        "exit_ppl": [math.exp(min(x, 700)) for x in exit_loss],
        "eval_tokens": int(totals[-1].item()),
    }


def format_ppl(ev: dict) -> str:
    if len(ev["exit_ppl"]) > 1:
        return " / ".join(f"{p:.2f}" for p in ev["exit_ppl"]) + " (per loop)"
    return f"{ev['ppl']:.2f}"


class MetricsLog:
    """metrics.jsonl, one JSON object per line, flushed at once (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # Resume: drop what the interrupted run logged after the checkpoint we restart from.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


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
