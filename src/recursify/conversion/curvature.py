"""Output-side curvature of the source model's linears: which output errors the model notices.

The calibrated closed form weighs a linear's input directions by how much real text excites them
(C = E[x x^T]) but treats every *output* direction alike, although the next layers amplify some
and ignore others. The distillation loss, KL(teacher || student), is zero with a zero gradient at
the teacher, so to second order it is a quadratic form in the weight error, the Fisher
information; K-FAC approximates a linear's block of it as G (x) C with G = E[g g^T], g the
gradient of the log-likelihood at the linear's output, under tokens *sampled from the model
itself* (the true Fisher, not the empirical one on the text's next tokens). Minimising
tr(G E C E^T) over the rank-r error E then minimises that approximation of the KD loss; it is the
two-sided whitening `activation_aware_factors(..., out_cov=G)` applies (as LLM Surgeon does for
structured pruning).

Gathered like the input statistics: once per (model, tokens), cached beside them, float32 means.
The backward pass needs gradients only with respect to activations, never weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..families import detect_family
from .calibrate import CalibrationStats, check_tokens, fingerprint, load_or_compute, save_tensors


def collect_curvature(source, sequences: torch.Tensor, batch_size: int = 1, seed: int = 0,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear: [L, out, out]}: the mean over `sequences`' tokens of g g^T at each linear's output,
    g = d log p(y) / d output with y drawn from the model's own next-token distribution.
    `batch_size` sequences go through each forward and backward: one (the default) keeps a quarter
    of the activations and logits a batch of four would, for the same sums."""
    family = detect_family(source.config)
    layers = list(source.get_submodule(family.layers))
    embed = source.get_input_embeddings()
    device = embed.weight.device
    check_tokens(source, sequences)
    # One preallocated [L, out, out] float32 stack per linear, added to in place and divided in place
    # (as `collect_stats` does): float64 per-layer sums stacked and divided at the end held the
    # statistics three times over at their last step (SmolLM2: 4.2 GB instead of 0.7).
    acc = {name: torch.zeros(len(layers), d, d, dtype=torch.float32, device=device)
           for name in family.linears
           for d in [layers[0].get_submodule(family.linears[name]).weight.shape[0]]}

    def record(name: str, index: int):
        def on_grad(g: torch.Tensor) -> None:
            g = g.reshape(-1, g.shape[-1]).float()
            acc[name][index].add_(g.T @ g)

        def hook(module, args, output):
            output.register_hook(on_grad)

        return hook

    hooks = [layer.get_submodule(family.linears[name]).register_forward_hook(record(name, i))
             for i, layer in enumerate(layers) for name in family.linears]
    frozen = [(p, p.requires_grad) for p in source.parameters()]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = source.training
    n_tokens = 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        source.eval()
        for start in tqdm(range(0, len(sequences), batch_size), desc="output curvature", disable=not progress,
                          leave=False):
            ids = sequences[start : start + batch_size].to(device)
            x = embed(ids).detach().requires_grad_(True)
            logits = source(inputs_embeds=x, use_cache=False).logits.float()
            with torch.no_grad():
                probs = logits.softmax(-1).flatten(0, 1).cpu()
                labels = torch.multinomial(probs, 1, generator=generator).view(ids.shape).to(device)
            F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
            n_tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        source.train(was_training)
    return {name: mats.div_(n_tokens).cpu() for name, mats in acc.items()}


def cached_curvature(source, sequences: torch.Tensor, cache_dir: str | Path | None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """`collect_curvature`, reusing a previous result for the same model and tokens."""
    if cache_dir is None:
        return collect_curvature(source, sequences, progress=progress)
    return load_or_compute(Path(cache_dir) / f"{fingerprint(source, sequences)}.curvature.safetensors", load_file,
                           lambda: collect_curvature(source, sequences, progress=progress),
                           lambda curvature, path: save_tensors(curvature, path))


def with_curvature(stats: CalibrationStats, source, sequences: torch.Tensor, cache: bool = True,
                   progress: bool = True) -> CalibrationStats:
    """`stats` with the output curvature on `sequences` attached (cached beside the input statistics
    in $RECURSIFY_CACHE unless `cache` is False), so that `convert` and `sequential_calibrate` fit
    both sides."""
    from ..util.paths import cache_root

    curvature = cached_curvature(source, sequences, cache_root() / "calibration" if cache else None, progress=progress)
    return dataclasses.replace(stats, curvature=curvature, curvature_tokens=sequences.numel())


__all__ = ["collect_curvature", "cached_curvature", "with_curvature"]
