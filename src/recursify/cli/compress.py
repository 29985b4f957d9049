"""`recursify compress`: the one command a newcomer needs."""

from __future__ import annotations

from typing import Optional

import typer

from .app import CLIError, app, console, device_option, out, split_list


@app.command()
def compress(
    model: str = typer.Argument("smollm2-135m", help="Source model: a bundled name, a Hugging Face folder or a .gguf file."),
    data: str = typer.Option(..., "--data", help="Training text (files/folders/.jsonl, comma-separated; several sources are mixed in proportion to their sizes, e.g. your text plus general text to keep general ability); its documents also calibrate the conversion."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output checkpoint folder (with summary.md and summary.json)."),
    heldout: Optional[str] = typer.Option(None, help="Held-out text for the evaluation (default: 5% of --data's documents, never trained on)."),
    loops: str = typer.Option("auto", "--loops", "-B", help="Number of loops (K = L / loops unique layers), or auto: convert every loop count that fits --target-params, each with the LoRA rank that fills it, and keep the one whose calibrated conversion scores best on training text, before any training (about 20 s a layout for SmolLM2 on 2 CPU cores)."),
    strategy: str = typer.Option("cycle", help="cycle, sequence, middle_cycle or middle_sequence."),
    init: str = typer.Option("calibrated", help="Shared-weight init: calibrated (fitted with the LoRA to what the layers' outputs see; 32 s more before training in docs/results' half-size SmolLM2 run on 2 CPU cores, and dropped for average when the budget is short), average, stepwise or lower. With --loops auto the layouts are compared with average init and the chosen one gets this one."),
    lora_rank: Optional[str] = typer.Option(None, "--lora-rank", "-r", help="Per-position LoRA rank. With --loops auto: chosen with the loops, or 'auto' for a rank per linear from the calibrated spectra. With a number of loops: an integer (default 64), 'full', or 'auto' (per linear, to fit --target-params)."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="With --loops auto (default 0.75) or --lora-rank auto: the student's size as a fraction of the teacher's parameters, e.g. 0.5."),
    time_budget: str = typer.Option("60m", "--time-budget", help="Wall-clock budget for everything, e.g. 10m, 1.5h. Longer budgets buy more distillation tokens."),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Tokens of --data to calibrate the conversion on."),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential", help="Refit each position's LoRA in order on the converted model's own inputs before training (GPTQ-style; a few minutes, worth far more distillation time)."),
    curvature: bool = typer.Option(True, "--curvature/--no-curvature", help="Also weigh each LoRA fit's output directions by how much the teacher's predictions notice them (K-FAC's output-gradient covariance, from backward passes over 8192 calibration tokens): a lower perplexity before training for a few more minutes of preparation, which in the 60-minute SmolLM2 run of docs/results paid for itself. Dropped when the budget is short, right after the layout search."),
    allocate: bool = typer.Option(True, "--allocate-ranks/--uniform-ranks", help="With --loops auto and the curvature: give each linear (q, k, v, o, gate, up, down) its own rank within the chosen layout's size, by the distillation loss each component removes (the curvature-weighted spectra), instead of one rank for all. In the SmolLM2 measurement of docs/results/rank-allocation.md it moves rank from attention to the MLPs."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training/evaluation sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per optimizer step."),
    lr: float = typer.Option(1e-4, help="Peak learning rate of the distillation, reached after at least 5 warm-up steps (lower than recursify train's: a calibrated start is already close; see docs/results' learning-rate sweep)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Distillation tokens at most (default: what the budget allows)."),
    local_fraction: float = typer.Option(0.0, "--local-fraction", help="Share of the training time for local distillation first (each position learns its teacher layer's output; no head, no teacher logits), the rest global KD. 0: KD only."),
    exit_schedule: str = typer.Option("none", "--exit-schedule", help="Early-exit losses at every loop end during distillation, for serving with early exit: none, weighted, aggressive (0.1 on intermediate exits, 1 on the last) or self_kd."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Hidden-state distillation: every unrolled position also learns the teacher's residual stream after the layer it stands for, at this weight beside the logits' KD. 0: logits only."),
    trainable: str = typer.Option("all", "--trainable", help="What distillation trains: all, or body (everything but the token embedding and LM head, which stay the teacher's; each step skips their gradient). The baseline trains the same set."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Held-out tokens for perplexity and agreement."),
    baseline: bool = typer.Option(False, "--baseline", help="Also distil the parameter-matched plain model (the largest evenly spaced subset of the teacher's layers with no more parameters) for the same training time, and report it beside the compressed one. Adds that training time after the budget."),
    baseline_lr: float = typer.Option(1e-3, "--baseline-lr", help="Peak learning rate of the --baseline model's distillation (its best in the sweep of docs/results; the compressed model's is --lr)."),
    paper_tasks: int = typer.Option(0, "--paper-tasks", help="Evaluate teacher, compressed (and baseline) on the first N items of each of the paper's seven benchmarks (needs recursify[eval]; adds its time after the budget). 0: skip."),
    overwrite: bool = typer.Option(False, help="Replace --out and discard an interrupted run."),
    device: str = device_option(),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype of the distillation (autocast; weights and Adam "
                              "stay float32) and of the evaluation, and the teacher's dtype while distilling: auto "
                              "(bfloat16 on a GPU that supports it, float32 on CPU), float32, bfloat16, float16. "
                              "Calibration and conversion maths stay float32/float64."),
    max_compute: Optional[float] = typer.Option(None, "--max-compute", help="With --loops auto: only layouts whose "
                                                "multiply-adds per token are at most this fraction of the teacher's "
                                                "(e.g. 1.05: smaller and at most 5% more work per token). Default: no limit."),
    gradient_checkpointing: str = typer.Option("auto", "--gradient-checkpointing", help="Recompute each unrolled "
                                               "position's activations in the backward: auto (on when the memory plan "
                                               "does not fit without it), on, off."),
    reuse_freed_memory: bool = typer.Option(False, "--reuse-freed-memory", help="On a CPU, distil keeping freed "
                                            "buffers for the next step instead of returning them to the kernel: "
                                            "faster KD steps (no page faults), a resident peak above what is alive "
                                            "(both measured in docs/compress.md)."),
):
    """Calibrate, convert, distil and evaluate in one go, within a time budget.

    Writes an ordinary recursify checkpoint plus a summary (parameters, held-out perplexity of
    teacher / converted / compressed model, top-1 agreement, generations side by side). Killed
    half-way? Run the same command again: it resumes. Example:

      recursify compress smollm2-135m --data corpus/python-docs/train --time-budget 60m --out runs/small

    It chooses the loops and rank for 75% of the teacher's parameters unless told otherwise:
    --target-params 0.5 for half the size, or --loops 2 --lora-rank 64 for a fixed layout.
    """
    from ..compress import CompressConfig, CompressError, parse_duration
    from ..compress import compress as run

    try:
        loops = loops.strip().lower()
        if loops != "auto":
            if not loops.isdigit():
                raise CompressError(f"--loops must be a number of loops or auto, got {loops!r}")
            loops = int(loops)
        cfg = CompressConfig(model=model, out=out_dir, data=split_list(data), heldout=split_list(heldout) or None,
                             loops=loops, strategy=strategy, init=init, lora_rank=lora_rank, target_params=target_params,
                             time_budget=parse_duration(time_budget), calib_tokens=calib_tokens, sequential=sequential, curvature=curvature, allocate=allocate, seq_len=seq_len,
                             batch_size=batch_size, lr=lr, max_tokens=max_tokens, local_fraction=local_fraction, exit_schedule=exit_schedule,
                             hidden_weight=hidden_weight, trainable=trainable, eval_tokens=eval_tokens,
                             baseline=baseline, baseline_lr=baseline_lr, paper_tasks=paper_tasks, overwrite=overwrite,
                             device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                             reuse_freed_memory=reuse_freed_memory, max_compute=max_compute)
        summary = run(cfg, log=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    except CompressError as e:
        raise CLIError(str(e)) from e
    out.print(f"wrote {out_dir} ({summary['ppl']['student']:.2f} held-out ppl, teacher {summary['ppl']['teacher']:.2f})")
