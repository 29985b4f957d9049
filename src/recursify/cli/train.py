"""Training commands: uptrain by distillation, plot a run's loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import PASSTHROUGH, CLIError, app, out


@app.command("train", context_settings=PASSTHROUGH, add_help_option=False)
def train_command(ctx: typer.Context, student: Optional[str] = typer.Argument(None, help="Checkpoint to uptrain.")):
    """Uptrain by distillation: recursify train STUDENT --teacher smollm2-135m --data corpus/ --out runs/x (see --help).

    Runs unchanged under `accelerate launch -m recursify train ...` or torchrun (DDP/FSDP).
    """
    from ..train.trainer import main as train_main

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
    from ..train.metrics import plot_metrics

    if not (run_dir / "metrics.jsonl").exists():
        raise CLIError(f"{run_dir} has no metrics.jsonl: not a training run folder")
    out.print(f"wrote {plot_metrics(run_dir)}")
