"""CLI commands over the training, evaluation and serving subsystems."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import CLIError, app, console, out


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder, HF folder, .gguf file or bundled name."),
    data: Optional[str] = typer.Option(None, help="Held-out text: comma-separated files/folders (.txt .md .rst .jsonl, save_to_disk folders)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model for KL / top-1 agreement (e.g. smollm2-135m)."),
    tasks: str = typer.Option("ppl,exits,agreement", help="Comma-separated: ppl, exits, agreement, cloze, paper (all seven benchmarks) or single benchmarks (lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, openbookqa)."),
    train_data: Optional[str] = typer.Option(None, help="Training data, to warn if held-out sequences overlap it."),
    seq_len: int = typer.Option(512, help="Context length for perplexity windows and agreement."),
    max_tokens: int = typer.Option(16384, help="Held-out tokens to score."),
    limit: Optional[int] = typer.Option(None, help="Items per lm-eval benchmark (quick runs)."),
    batch_size: int = typer.Option(4),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
):
    """Measure a checkpoint against its teacher: perplexity, per-exit perplexity, agreement, cloze, benchmarks."""
    from .eval.evaluate import EvalConfig, evaluate, format_result, write_json

    cfg = EvalConfig(
        model=model, data=_split(data), teacher=teacher, tasks=_split(tasks), train_data=_split(train_data),
        seq_len=seq_len, max_tokens=max_tokens, limit=limit, batch_size=batch_size,
    )
    result = evaluate(cfg, console=console)
    out.print(format_result(result))
    if json_out:
        console.print(f"wrote {write_json(result, json_out)}")


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("train", context_settings=_PASSTHROUGH, add_help_option=False)
def train_command(ctx: typer.Context, student: Optional[str] = typer.Argument(None, help="Checkpoint to uptrain.")):
    """Uptrain by distillation: recursify train STUDENT --teacher smollm2-135m --data corpus/ --out runs/x (see --help).

    Runs unchanged under `accelerate launch -m recursify train ...` or torchrun (DDP/FSDP).
    """
    from .train.trainer import main as train_main

    argv = list(ctx.args)
    if student and not student.startswith("-"):
        argv = ["--student", student] + argv
    elif student:
        argv = [student] + argv
    code = train_main(argv)
    if code:
        raise typer.Exit(code)


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="A training output folder (with metrics.jsonl).")):
    """Plot the loss curves of a training run to RUN_DIR/loss.png."""
    from .train.plot import plot_metrics

    if not (run_dir / "metrics.jsonl").exists():
        raise CLIError(f"{run_dir} has no metrics.jsonl: not a training run folder")
    out.print(f"wrote {plot_metrics(run_dir)}")


@app.command()
def serve(
    checkpoint: str = typer.Argument(..., help="A recursify checkpoint, HF causal-LM folder or bundled name."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_batch: int = typer.Option(8, help="Concurrent sequences (KV-cache slots)."),
    exit_threshold: Optional[float] = typer.Option(None, help="Early exit when the intermediate max softmax probability ≥ this."),
    exit_mode: Optional[str] = typer.Option(None, help="Exit rule: confidence (default with a threshold), entropy, oracle."),
    max_model_len: Optional[int] = typer.Option(None, help="Longest prompt + completion (default: the model's context)."),
    max_queue: int = typer.Option(64, help="Waiting requests before 429."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads."),
):
    """Serve a checkpoint behind an OpenAI-compatible HTTP API (continuous depth-wise batching)."""
    from .server import serve as run_server

    run_server(checkpoint, host=host, port=port, max_batch=max_batch, exit_threshold=exit_threshold,
               exit_mode=exit_mode, max_model_len=max_model_len, max_queue=max_queue, threads=threads)


@app.command("bench-serve", context_settings=_PASSTHROUGH, add_help_option=False)
def bench_serve(ctx: typer.Context):
    """Serving benchmark (rows a-f of benchmarks/serve.py); run from a source checkout. Options: see --help."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"
    if not script.exists():
        raise CLIError("bench-serve runs benchmarks/serve.py from a source checkout of recursify")
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")


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
    limit: Optional[int] = typer.Option(None, help="Override the budget's items per lm-eval task."),
    benchmarks: bool = typer.Option(True, help="Run the seven lm-eval tasks on the main models."),
    rerun: bool = typer.Option(False, help="Recompute every cell instead of reusing finished ones."),
    list_cells: bool = typer.Option(False, "--list", help="Print the planned cells and exit."),
):
    """Ablations and baselines against the paper: strategy x init x rank x {no training, KD}, early-exit recipes.

    Finished cells are cached in OUT/cells/, so an interrupted report resumes where it stopped.
    Default data comes from scripts/fetch_corpora.sh.
    """
    from .report import ReportConfig, plan_cells, run_report

    cfg = ReportConfig(model=model, budget=budget, out=str(out_dir), data=_split(data), heldout=_split(heldout),
                       train_tokens=train_tokens, task_limit=limit, benchmarks=benchmarks, rerun=rerun)
    if list_cells:
        cells = plan_cells(cfg.resolve_budget(), benchmarks=benchmarks)
        for c in cells:
            out.print(f"{c.key:<45} {'trained' if c.trained else 'untrained':<9} "
                      f"{'benchmarks ' if c.benchmarks else ''}{','.join(c.tags)}")
        out.print(f"{len(cells)} cells")
        return
    summary = run_report(cfg, console=console)
    from .report.render import terminal_summary

    table, lines = terminal_summary(summary)
    out.print(table)
    for line in lines:
        out.print(line, markup=False)
    out.print(f"wrote {out_dir / 'report.md'} ({len(summary['computed'])} cells computed, "
              f"{len(summary['cells']) - len(summary['computed'])} cached, {summary['seconds'] / 60:.1f} min)")
