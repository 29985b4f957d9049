"""Model-level commands: convert a checkpoint, generate from it, inspect it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import (CLIError, app, atomic_output_dir, console, device_option, dir_size, dtype_option, human_bytes, out,
                  placement, split_list)


def source_breakdown(model) -> dict[str, int]:
    """Parameters of a Hugging Face model split like `RecursiveForCausalLM.parameter_breakdown`."""
    from ..families import detect_family

    family = detect_family(model.config)
    embed = model.get_input_embeddings().weight
    layers = model.get_submodule(family.layers)
    counts = {"embedding": embed.numel(), "shared": sum(p.numel() for p in layers.parameters()), "lora": 0}
    seen = {id(p) for p in layers.parameters()} | {id(embed)}
    counts["other"] = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    counts["total"] = sum(counts.values())
    return counts


@app.command()
def convert(
    model: str = typer.Argument(..., help="Source model: a bundled name (smollm2-135m, gemma3-270m), a Hugging Face folder or a .gguf file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder."),
    loops: int = typer.Option(2, "--loops", "-B", help="Number of loops B; K = L / B unique layers. B must divide L."),
    strategy: str = typer.Option("cycle", help="Layer-to-slot map: cycle (ABC|ABC), sequence (AA|BB|CC), middle_cycle, middle_sequence."),
    init: str = typer.Option("stepwise", help="Shared-weight init: stepwise, average, lower, random, or calibrated (with --calibrate: fitted jointly with the LoRA to what the layers' outputs see)."),
    lora_rank: str = typer.Option("0", "--lora-rank", "-r", help="Per-position LoRA rank: 0 (plain recursive), an integer, 'full' (exact), or 'auto' (a rank per linear from the calibrated spectra, to fit --target-params; needs --calibrate; with --curvature the spectra are weighed by it, which is what compress uses)."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="With --lora-rank auto: the converted model's size as a fraction of the source's parameters, e.g. 0.75."),
    lora_init: str = typer.Option("svd", help="LoRA init: svd (truncated SVD of W_l - W_shared) or zero."),
    variant: str = typer.Option("relaxed", help="relaxed (Relaxed Recursive Transformer) or residual (ResidualTransformer)."),
    share_norms: bool = typer.Option(False, "--share-norms", help="Tie norms (and biases) per shared slot instead of per position."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated LoRA targets (default: every linear: q,k,v,o,gate,up,down)."),
    seed: int = typer.Option(0, help="Seed for init=random."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", help="Text (files/folders/.jsonl, comma-separated) to calibrate the LoRA init on: each position's LoRA then fits what the layer's outputs see on real inputs instead of the raw weight difference. Far better before any training; statistics are cached."),
    calib_tokens: int = typer.Option(16384, "--calib-tokens", help="Tokens of --calibrate text to gather statistics on."),
    damp: float = typer.Option(0.01, help="With --calibrate: ridge added to each input covariance, as a fraction of its mean diagonal."),
    sequential: bool = typer.Option(False, "--sequential", help="With --calibrate: then refit each position's LoRA in order on the converted model's own inputs, so it corrects the error earlier positions left (GPTQ-style)."),
    curvature: bool = typer.Option(False, "--curvature", help="With --calibrate: also weigh each linear's output directions by how much the model's predictions notice them (the output-gradient covariance of K-FAC, from backward passes of the original over up to 8192 of the tokens; cached). Lower perplexity before training for about twice the conversion time."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    device: str = device_option(),
    dtype: str = typer.Option("float32", "--dtype", help="Dtype of the saved checkpoint: float32 (default), bfloat16, "
                              "float16 or auto. The decompositions run in float32/float64 whatever it is."),
):
    """Convert a pretrained causal LM into a (Relaxed) Recursive Transformer checkpoint.

    Example: recursify convert smollm2-135m --loops 2 --lora-rank 64 --calibrate corpus/python-docs/train --out runs/rec2c
    """
    import recursify as rf

    t0 = time.time()
    where = placement(device, dtype)
    auto = lora_rank == "auto"
    if auto and (not calibrate or target_params is None):
        raise CLIError("--lora-rank auto chooses ranks from calibration statistics: pass --calibrate DATA and --target-params")
    if target_params is not None and not auto:
        raise CLIError("--target-params needs --lora-rank auto")
    if init == "calibrated" and not calibrate:
        raise CLIError("--init calibrated fits the shared weights to calibration statistics: pass --calibrate DATA")
    if (sequential or curvature) and not calibrate:
        raise CLIError(f"--{'sequential' if sequential else 'curvature'} needs --calibrate DATA")
    recursion = rf.RecursionConfig(
        num_loops=loops,
        strategy=strategy,
        init=init,
        lora_rank=0 if auto else lora_rank,
        lora_init=lora_init,
        variant=variant,
        share_norms=share_norms,
        lora_targets=[t.strip() for t in targets.split(",")] if targets else None,
        seed=seed,
    )
    if Path(out_dir).exists() and not overwrite:
        raise CLIError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    source_config = rf.hub.load_config(model)
    family = rf.families.detect_family(source_config)
    rf.Layout.build(rf.families.arch_from_config(family, source_config).num_layers, recursion)
    with console.status(f"loading {model}"):
        teacher, tokenizer = rf.load_pretrained(model, device=where.device)  # float32: the maths' dtype
    t_load = time.time() - t0
    before = source_breakdown(teacher)
    stats = fit_seqs = None
    if calibrate:
        from ..conversion.calibrate import calibrate as gather
        from ..conversion.calibrate import calibration_sequences

        if damp < 0:
            raise CLIError(f"--damp must be >= 0, got {damp}")
        stats = gather(teacher, tokenizer, split_list(calibrate), num_tokens=calib_tokens)
        if sequential or curvature:  # the refit's and the curvature's tokens
            fit_seqs = calibration_sequences(split_list(calibrate), tokenizer, min(calib_tokens, 8192))
    t1 = time.time()
    if stats is None:
        student = rf.convert(teacher, recursion, progress=True, damp=damp)
    else:  # with --curvature, --lora-rank auto allocates by the distillation loss each component removes
        from ..conversion.recipe import calibrated_convert

        student = calibrated_convert(teacher, recursion, stats, fit_seqs, sequential=sequential, curvature=curvature,
                                     allocate_to=target_params if auto else None, damp=damp, progress=True,
                                     announce=(lambda r: console.print("ranks: " + r.rank_text)) if auto else None)
    student = student.to(where.dtype)
    t_convert = time.time() - t1
    with atomic_output_dir(out_dir, overwrite) as tmp, console.status(f"saving to {out_dir}"):
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    after = student.parameter_breakdown()
    size = dir_size(out_dir)
    layout = student.layout
    table = Table(title=f"recursify convert: {model} → {out_dir}")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("recursive", justify="right")
    table.add_row("layers (unrolled)", str(layout.num_layers), str(layout.num_layers))
    table.add_row("unique layers", str(layout.num_layers), f"{layout.num_slots} ({layout.num_loops} loops, {layout.strategy})")
    for key, label in (("embedding", "params: embedding"), ("shared", "params: layers / shared"), ("lora", "params: LoRA"), ("other", "params: other (norms, head)"), ("total", "params: total")):
        table.add_row(label, f"{before[key] / 1e6:.2f}M", f"{after[key] / 1e6:.2f}M")
    ne_before = before["total"] - before["embedding"]
    ne_after = after["total"] - after["embedding"]
    table.add_row("compression (total)", "", f"{before['total'] / after['total']:.2f}×")
    table.add_row("compression (non-embedding)", "", f"{ne_before / ne_after:.2f}×")
    table.add_row("checkpoint size", "", human_bytes(size))
    table.add_row("seconds (load / convert / total)", "", f"{t_load:.1f} / {t_convert:.1f} / {time.time() - t0:.1f}")
    out.print(table)


@app.command()
def generate(
    checkpoint: str = typer.Argument(..., help="A recursify checkpoint folder (or any model `convert` accepts)."),
    prompt: str = typer.Option("The capital of France is", help="Prompt text."),
    max_new_tokens: int = typer.Option(24, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    teacher: Optional[str] = typer.Option(None, help="Also generate from this model (e.g. smollm2-135m) for comparison."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    device: str = device_option(),
    dtype: str = dtype_option(),
):
    """Generate text from a checkpoint (and optionally its teacher, side by side)."""
    import torch

    import recursify as rf

    if max_new_tokens <= 0:
        raise CLIError("--max-new-tokens must be positive")
    where = placement(device, dtype)
    rows = []
    for role, name in ([("teacher", teacher)] if teacher else []) + [("model", checkpoint)]:
        with console.status(f"loading {name}"):
            model, tok = rf.load_pretrained(name, device=where.device, dtype=where.dtype)
        text = prompt
        if chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").to(where.device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        kwargs.update(do_sample=True, temperature=temperature) if temperature > 0 else kwargs.update(do_sample=False)
        t0 = time.time()
        with torch.no_grad():
            gen = model.generate(**ids, **kwargs)
        dt = time.time() - t0
        new = gen[0, ids["input_ids"].shape[1]:]
        rows.append((f"{role}: {Path(name).name or name}", tok.decode(new, skip_special_tokens=True), f"{len(new) / dt:.1f}"))
    table = Table(title=f"prompt: {prompt!r}")
    table.add_column("model", no_wrap=True)
    table.add_column("completion")
    table.add_column("tok/s", justify="right")
    for r in rows:
        table.add_row(*r)
    out.print(table)


@app.command()
def info(checkpoint: str = typer.Argument(..., help="A recursify checkpoint folder.")):
    """Show the recursion layout and parameter breakdown of a checkpoint."""
    import recursify as rf

    model, _ = rf.load_pretrained(checkpoint)
    if not isinstance(model, rf.RecursiveForCausalLM):
        raise CLIError(f"{checkpoint} is not a recursify checkpoint")
    table = Table(title=str(checkpoint))
    table.add_column("field")
    table.add_column("value")
    for k, v in model.recursion.to_dict().items():
        table.add_row(k, str(v))
    table.add_row("slot of position", " ".join(map(str, model.layout.slot_of_position)))
    for k, v in model.parameter_breakdown().items():
        table.add_row(f"params: {k}", f"{v / 1e6:.2f}M")
    out.print(table)
