"""`recursify report`: the paper's ablations and baselines, cached per cell."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, out, require, split_list


@app.command()
def report(
    model: str = typer.Option("smollm2-135m", help="Source model: bundled name, HF folder or .gguf file."),
    budget: str = typer.Option("small", help="small: ~1 hour on a 2-core CPU (tiny KD budgets, trends only); "
                                             "large: every grid cell uptrained on 4M tokens, for a GPU."),
    out_dir: Path = typer.Option(Path("reports/smollm2"), "--out", help="Report folder: report.md, results.json, "
                                                                        "PNG plots, cells/ (the resumable cache)."),
    data: str = typer.Option("corpus/python-docs/train", help="Training text (comma-separated files/folders)."),
    heldout: str = typer.Option("corpus/python-docs/heldout", help="Held-out text, other documents than --data."),
    train_tokens: Optional[int] = typer.Option(None, help="Override the budget's KD tokens per trained model."),
    calib_tokens: Optional[int] = typer.Option(None, help="Override the budget's calibration tokens (training data) "
                                                          "of the calibrated-conversion cells."),
    limit: Optional[int] = typer.Option(None, help="Override the budget's items per lm-eval task."),
    benchmarks: bool = typer.Option(True, help="Run the seven lm-eval tasks on the main models."),
    rerun: bool = typer.Option(False, help="Recompute every cell instead of reusing finished ones."),
    list_cells: bool = typer.Option(False, "--list", help="Print the planned cells and exit."),
):
    """Ablations and baselines against the paper: strategy x init x rank x {no training, KD}, early-exit recipes,
    calibrated conversion (plain vs calibrated, local+KD vs KD, uniform vs allocated ranks).

    Finished cells are cached in OUT/cells/, so an interrupted report resumes where it stopped.
    Default data comes from scripts/fetch_corpora.sh.
    """
    from ..report import ReportConfig, plan_cells, run_report

    cfg = ReportConfig(model=model, budget=budget, out=str(out_dir), data=split_list(data), heldout=split_list(heldout),
                       train_tokens=train_tokens, calib_tokens=calib_tokens, task_limit=limit, benchmarks=benchmarks, rerun=rerun)
    if list_cells:
        cells = plan_cells(cfg.resolve_budget(), benchmarks=benchmarks)
        for c in cells:
            out.print(f"{c.key:<45} {'trained' if c.trained else 'untrained':<9} "
                      f"{'benchmarks ' if c.benchmarks else ''}{','.join(c.tags)}")
        out.print(f"{len(cells)} cells")
        return
    if benchmarks:
        cfg.resolve_budget()  # a bad --budget or --limit is reported before a missing lm-eval
        require("lm_eval", "recursify report", hint="or pass --no-benchmarks")
    summary = run_report(cfg, console=console)
    from ..report.render import terminal_summary

    table, lines = terminal_summary(summary)
    out.print(table)
    for line in lines:
        out.print(line, markup=False)
    out.print(f"wrote {out_dir / 'report.md'} ({len(summary['computed'])} cells computed, "
              f"{len(summary['cells']) - len(summary['computed'])} cached, {summary['seconds'] / 60:.1f} min)")
