"""Serving commands: the OpenAI-compatible server and its benchmark."""

from __future__ import annotations

from typing import Optional

import typer

from .app import PASSTHROUGH, app, device_option, dtype_option, placement


@app.command()
def serve(
    checkpoint: str = typer.Argument(..., help="A recursify checkpoint, HF causal-LM folder or bundled name."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_batch: int = typer.Option(8, help="Concurrent sequences (KV-cache slots)."),
    exit_threshold: Optional[float] = typer.Option(None, help="Early-exit threshold in (0, 1]: the exit rule's score must reach it."),
    exit_mode: Optional[str] = typer.Option(None, help="Exit rule: confidence (default with a threshold), entropy, saturation, oracle, or classifier (the probe `recursify exits fit` saved in CHECKPOINT; its calibrated threshold unless --exit-threshold)."),
    max_model_len: Optional[int] = typer.Option(None, help="Longest prompt + completion (default: the model's context)."),
    max_queue: int = typer.Option(64, help="Waiting requests before 429."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads."),
    device: str = device_option(),
    dtype: str = dtype_option(),
):
    """Serve a checkpoint behind an OpenAI-compatible HTTP API (continuous depth-wise batching).

    Example: recursify serve runs/demo --port 8000 (on a GPU: bfloat16 by default)
    """
    from ..server import serve as run_server

    where = placement(device, dtype)
    run_server(checkpoint, host=host, port=port, max_batch=max_batch, exit_threshold=exit_threshold,
               exit_mode=exit_mode, max_model_len=max_model_len, max_queue=max_queue, threads=threads,
               device=where.device, dtype=where.dtype)


@app.command("bench-serve", context_settings=PASSTHROUGH, add_help_option=False)
def bench_serve(ctx: typer.Context):
    """Serving benchmark: throughput, TTFT/TPOT, exit policies' speed and agreement; --student PATH. Options: see --help."""
    from ..bench.serve import main as bench_main

    bench_main(list(ctx.args), prog="recursify bench-serve")
