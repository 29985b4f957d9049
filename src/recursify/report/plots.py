"""The report's three PNG plots: perplexity against parameters, against KD tokens, exit depth against agreement."""

from __future__ import annotations

from pathlib import Path

PLOTS = {"ppl_vs_params": "ppl_vs_params.png", "ppl_vs_tokens": "ppl_vs_tokens.png",
         "exit_vs_agreement": "exit_vs_agreement.png"}


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and write one figure (the same finish for every plot of the report)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(res, out: Path) -> dict[str, Path]:
    """Write the three plots of `res` (a `render.Results`) into `out`: name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    teacher = res.get("teacher")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for c in res.summary["cells"]:
        r, spec = c["result"], c["cell"]
        if not spec["trained"] or spec["exit_schedule"] != "none" or spec["objective"] != "kd":
            continue
        if spec["model"] == "truncated":
            kind, marker, color = "truncated (first K layers)", "s", "tab:red"
        elif spec["model"] == "layer_subset":
            kind, marker, color = "K stepwise layers, no loop", "D", "tab:orange"
        elif spec["variant"] == "residual":
            kind, marker, color = "residual", "^", "tab:purple"
        elif spec.get("calibration", "none") != "none":
            kind, marker, color = "calibrated conversion", "v", "tab:brown"
        elif spec["rank"] == 0:
            kind, marker, color = "recursive r=0 (ablations)", "o", "tab:blue"
        else:
            kind, marker, color = "relaxed (ablations)", "o", "tab:green"
        ax.scatter(r["params"] / 1e6, r["ppl"], c=color, marker=marker, s=36, label=None if kind in seen else kind)
        seen.add(kind)
        if spec["model"] == "recursive" and spec["rank"] != 0 and "main" in c["tags"]:
            ax.annotate(f"r={spec['rank']}", (r["params"] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    if teacher:
        ax.scatter(teacher["params"] / 1e6, teacher["ppl"], c="black", marker="*", s=120, label="teacher")
    ax.legend(fontsize=7, loc="center right")
    ax.set_yscale("log")
    paths["ppl_vs_params"] = _save(fig, ax, out / PLOTS["ppl_vs_params"], "parameters (M)", "held-out perplexity (log)",
                                   f"After {res.budget['train_tokens']:,} KD tokens: perplexity vs parameters")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in res.tagged("main"):
        curve = c["result"].get("curve")
        if curve:
            ax.plot([p["tokens"] for p in curve], [p["ppl"] for p in curve], marker="o", ms=3, label=c["label"])
    if teacher:
        ax.axhline(teacher["ppl"], color="black", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    paths["ppl_vs_tokens"] = _save(fig, ax, out / PLOTS["ppl_vs_tokens"], "KD training tokens",
                                   "held-out perplexity (log)", "Perplexity during uptraining")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in res.tagged("exits"):
        curve = c["result"].get("exit_curve")
        if curve:
            ax.plot([p["mean_loops"] for p in curve], [p["agreement"] for p in curve], marker="o", ms=3,
                    label=f"{c['cell']['exit_schedule']} exit loss")
    ax.legend(fontsize=8)
    paths["exit_vs_agreement"] = _save(fig, ax, out / PLOTS["exit_vs_agreement"],
                                       "mean loops run per token (confidence exit)", "top-1 agreement with the teacher",
                                       "Early exit: depth vs agreement")
    return paths
