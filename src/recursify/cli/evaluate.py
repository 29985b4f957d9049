"""`recursify eval`: measure a checkpoint against its teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, console, device_option, dtype_option, out, placement, require, split_list


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder, HF folder, .gguf file or bundled name."),
    data: Optional[str] = typer.Option(None, help="Held-out text: comma-separated files/folders (.txt .md .rst .jsonl, save_to_disk folders)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model for KL / top-1 agreement (e.g. smollm2-135m)."),
    tasks: str = typer.Option("ppl,exits,agreement", help="Comma-separated: ppl, exits, agreement, cloze, paper (all seven benchmarks) or single benchmarks (lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, openbookqa)."),
    train_data: Optional[str] = typer.Option(None, help="Training data, to warn if held-out sequences overlap it."),
    seq_len: int = typer.Option(512, help="Context length for perplexity windows and agreement."),
    max_tokens: int = typer.Option(16384, help="Held-out tokens to score."),
    stride: Optional[int] = typer.Option(None, help="Tokens between perplexity windows (default: half of --seq-len, "
                                         "so every window after the first has that much context; --stride equal to "
                                         "--seq-len scores disjoint windows, as compress's summary does)."),
    limit: Optional[int] = typer.Option(None, help="Items per lm-eval benchmark (quick runs)."),
    batch_size: int = typer.Option(4),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    device: str = device_option(),
    dtype: str = dtype_option(),
):
    """Measure a checkpoint against its teacher: perplexity, per-exit perplexity, agreement, cloze, benchmarks."""
    from ..eval.evaluate import EvalConfig, evaluate, format_result, parse_tasks, write_json

    placement(device, dtype)  # a device or dtype this machine lacks: one line before anything else
    _, benchmarks = parse_tasks(split_list(tasks))
    if benchmarks:
        require("lm_eval", f"recursify eval --tasks {tasks}")
    cfg = EvalConfig(
        model=model, data=split_list(data), teacher=teacher, tasks=split_list(tasks), train_data=split_list(train_data),
        seq_len=seq_len, max_tokens=max_tokens, stride=stride, limit=limit, batch_size=batch_size,
        device=device, dtype=dtype,
    )
    result = evaluate(cfg, console=console)
    out.print(format_result(result))
    if json_out:
        console.print(f"wrote {write_json(result, json_out)}")
