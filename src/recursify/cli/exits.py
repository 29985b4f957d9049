"""`recursify exits`: the learned early-exit classifier (CALM-style probes) of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import CLIError, app, device_option, dtype_option, out, placement

exits = typer.Typer(
    no_args_is_help=True,
    help="Learned early exit: fit the per-loop-boundary exit classifier that `serve --exit-mode classifier` uses.",
)
app.add_typer(exits, name="exits")


def _check_checkpoint(checkpoint: str) -> None:
    """One line unless `checkpoint` is a saved recursive model with a loop boundary to exit at."""
    from ..config import Layout
    from ..hub import ModelLoadError, load_config

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{checkpoint}: no config.json, so not a recursive checkpoint (the output of `recursify convert`, "
                       "`compress` or `train`)")
    try:
        config = load_config(checkpoint)
    except ModelLoadError as e:
        raise CLIError(str(e).strip().splitlines()[0]) from None
    if getattr(config, "model_type", None) != "recursify":
        raise CLIError(f"{checkpoint}: a {config.model_type!r} model, not a recursive checkpoint (the output of "
                       "`recursify convert`, `compress` or `train`)")
    rec = config.recursion_config()
    if rec.num_loops < 2 or not Layout(0, rec.num_loops, rec.strategy).loopable:
        raise CLIError(f"{checkpoint}: strategy {rec.strategy!r} with {rec.num_loops} loop(s) has no loop boundary to "
                       "exit at; exit classifiers need a cycle strategy with 2+ loops")


def _sequences(data: list[str], heldout: list[str], tokenizer, seq_len: int, tokens: int, heldout_tokens: int):
    """([n, seq_len] fitting ids, [m, seq_len] held-out ids): --heldout documents when given, else
    the data's own hash-split held-out documents (never the ones fitted on)."""
    import torch

    from ..data import DataConfig, DataError, build_datasets

    cfg = DataConfig(sources=list(data), seq_len=seq_len, max_tokens=tokens, heldout_sources=list(heldout) or None,
                     heldout_tokens=heldout_tokens, heldout_fraction=0.1)
    try:
        train, held = build_datasets(cfg, tokenizer)
    except DataError as e:
        raise CLIError(f"exit classifier data: {e}") from None

    def ids(ds, budget):
        n = max(1, min(len(ds), budget // seq_len))
        return torch.stack([torch.as_tensor(ds.sequence(i).astype("int64")) for i in range(n)])

    return ids(train, tokens), ids(held, heldout_tokens)


FIT_HELP = "\n\n".join([
    "Fit the exit classifier of CHECKPOINT and calibrate its threshold.",
    "For each loop boundary, a logistic-regression probe on the final-normed residual stream predicts whether the exit "
    "head's argmax there equals the full-depth argmax: one dot product per token at serving time, no LM head. The "
    "labels come from the checkpoint itself on --data (no teacher needed).",
    "Then the lowest threshold that keeps --target-agreement (token agreement with full depth) on held-out text is "
    "chosen. One threshold serves every boundary: a token leaves at the first boundary whose probe reaches it.",
    "Writes exit_classifier.safetensors and exit_classifier.json into CHECKPOINT and prints each boundary's exit rate "
    "and agreement. Serve with: recursify serve CHECKPOINT --exit-mode classifier",
    "Example: recursify exits fit runs/rec2 --data corpus/ --heldout heldout.txt --target-agreement 0.95",
])


@exits.command("fit", help=FIT_HELP)
def fit(
    checkpoint: str = typer.Argument(..., help="A recursive checkpoint folder (recursify convert/compress/train output); "
                                               "the two files are written into it."),
    data: List[str] = typer.Option(..., "--data", help="Text to fit on: .txt/.jsonl files or folders (repeat the option)."),
    heldout: Optional[List[str]] = typer.Option(None, "--heldout", help="Text to calibrate the threshold on (repeatable); "
                                                "default: documents of --data held out by hash, never fitted on."),
    target_agreement: float = typer.Option(0.95, help="Token agreement with full depth to keep, in (0, 1]: the "
                                                      "threshold is the lowest that keeps it on the held-out text."),
    tokens: int = typer.Option(16_384, help="Token positions to fit on (each one labelled by the model itself)."),
    heldout_tokens: int = typer.Option(8_192, help="Held-out token positions to calibrate on."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    steps: int = typer.Option(200, help="L-BFGS iterations per probe (logistic regression)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
):
    """See FIT_HELP: fit, calibrate on held-out text, write the two files, print the table."""
    where = placement(device, dtype)
    if not 0 < target_agreement <= 1:
        raise CLIError(f"--target-agreement must be in (0, 1], got {target_agreement}")
    for name, value in (("--tokens", tokens), ("--heldout-tokens", heldout_tokens), ("--batch-size", batch_size),
                        ("--steps", steps)):
        if value < 1:
            raise CLIError(f"{name} must be a positive integer, got {value}")
    if seq_len < 2 or tokens < seq_len or heldout_tokens < seq_len:
        raise CLIError(f"--tokens and --heldout-tokens must each hold one sequence of --seq-len {seq_len} (>= 2)")
    _check_checkpoint(checkpoint)

    from transformers import AutoTokenizer

    from ..engine.exit_classifier import fit_and_calibrate
    from ..hub import load_pretrained

    # The data first: a corpus too small costs one line before any weights are read.
    fit_ids, held_ids = _sequences(data, heldout or [], AutoTokenizer.from_pretrained(checkpoint), seq_len, tokens,
                                   heldout_tokens)
    model, _ = load_pretrained(checkpoint, device=where.device, dtype=where.dtype)
    clf, cal = fit_and_calibrate(model, fit_ids.split(batch_size), held_ids.split(batch_size), target_agreement,
                                 steps=steps)
    clf.save(checkpoint)
    _print_table(cal, clf.meta["tokens_fitted"], clf.meta["heldout_tokens"], checkpoint)


def _print_table(cal, fitted: int, held: int, checkpoint: str) -> None:
    from rich.table import Table

    table = Table(title=f"exit classifier of {checkpoint}: fitted on {fitted} tokens, measured on {held} held-out tokens",
                  caption="per boundary: share of all tokens leaving there, and how many of those agree with full depth; "
                          "all tokens: tokens that run full depth count as agreeing")
    for col in ("boundary", "exit rate", "agreement", "threshold"):
        table.add_column(col, justify="right")
    for b, (rate, agree) in enumerate(zip(cal.boundary_exit_rate, cal.boundary_agreement), start=1):
        table.add_row(f"after loop {b}", f"{rate:.1%}", f"{agree:.1%}", f"{cal.threshold:.4g}")
    table.add_row("all tokens", f"{cal.exit_rate:.1%}", f"{cal.agreement:.1%}", f"{cal.threshold:.4g}")
    out.print(table)
    if not cal.met:
        out.print("the target agreement is not reachable on the held-out text even with threshold 1.0")
    out.print(f"wrote exit_classifier.safetensors and exit_classifier.json to {checkpoint}")
