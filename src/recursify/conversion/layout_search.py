"""Choosing the number of loops for a parameter budget, from what calibration already knows.

At a fixed size a recursive model can loop fewer unique layers more often and spend the
parameters that saves on per-position LoRA rank, or the reverse. Which split is best depends on
the model and the budget, and it is decided before any training: the calibrated conversion of each
candidate (the teacher's statistics do not depend on the layout, so they are gathered once) is
scored on a slice of the training text, and the candidate with the lowest perplexity is kept. On SmolLM2-135M
that ranking before training is the ranking after distillation (benchmarks/recover.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError, Layout, RecursionConfig
from ..families import arch_from_config, detect_family
from .allocate import allocate_ranks, macs_per_token, parameter_count
from .calibrate import CalibrationStats


@dataclass
class Candidate:
    """One layout that fits the budget: `recursion` holds its loops and rank(s)."""

    recursion: RecursionConfig
    params: int
    ppl: float | None = None
    compute: float | None = None  # multiply-adds per token as a fraction of the source's

    @property
    def loops(self) -> int:
        return self.recursion.num_loops

    @property
    def rank(self) -> str:
        return self.recursion.rank_text


def _num_layers(source) -> int:
    return arch_from_config(detect_family(source.config), source.config).num_layers


def full_ranks(source, recursion: RecursionConfig) -> dict[str, int]:
    """Each target linear's full rank, min(d_out, d_in): more LoRA rank than that buys nothing."""
    family = detect_family(source.config)
    layer = source.get_submodule(family.layers)[0]
    return {t: min(layer.get_submodule(family.linears[t]).weight.shape) for t in recursion.lora_targets or family.linears}


def capped(recursion: RecursionConfig, rank: int, full: dict[str, int]) -> RecursionConfig:
    """Uniform rank `rank`, each linear capped at its full rank (as a per-linear pattern when any is)."""
    if all(rank <= f for f in full.values()):
        return dataclasses.replace(recursion, lora_rank=rank, rank_pattern=None)
    return dataclasses.replace(recursion, lora_rank=0, rank_pattern={t: min(rank, f) for t, f in full.items()})


def largest_rank(source, recursion: RecursionConfig, budget: int) -> RecursionConfig | None:
    """`recursion` with the largest uniform LoRA rank (each linear capped at its full rank) whose
    model has at most `budget` parameters; None when not even rank 0 fits."""
    full = full_ranks(source, recursion)
    fits = lambda r: parameter_count(source, capped(recursion, r, full)) <= budget  # noqa: E731
    if not fits(0):
        return None
    lo, hi = 0, max(full.values())
    while lo < hi:  # the count grows with the rank: bisect for the last rank that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return capped(recursion, lo, full)


def candidates(source, target_params: float, strategy: str = "cycle", init: str = "average",
               calibration: CalibrationStats | None = None, allocate: bool = False,
               damp: float = 0.01, max_compute: float | None = None) -> list[Candidate]:
    """Every loop count the layout allows (2 and up) that fits `target_params` of the source's
    parameters, each with the rank(s) that fill the budget: one uniform rank (capped per linear at
    its full rank), or per-linear ranks from the calibrated spectra with `allocate` (needs
    `calibration`). `max_compute`: keep only layouts whose multiply-adds per token are at most
    that fraction of the source's (`allocate.macs_per_token`)."""
    total = sum(p.numel() for p in source.parameters())
    source_macs = macs_per_token(source)
    budget = int(target_params * total)
    num_layers = _num_layers(source)
    found = []
    for loops in range(2, num_layers + 1):
        recursion = RecursionConfig(num_loops=loops, strategy=strategy, init=init, lora_rank=0)
        try:
            Layout.build(num_layers, recursion)
        except ConfigError:
            continue  # loops does not divide the shared layers
        uniform = largest_rank(source, recursion, budget)
        if uniform is None:
            continue
        if allocate:
            pattern = allocate_ranks(source, recursion, calibration, target_params, damp=damp)
            recursion = dataclasses.replace(recursion, rank_pattern=pattern)
        else:
            recursion = uniform
        found.append(Candidate(recursion, parameter_count(source, recursion),
                               compute=macs_per_token(source, recursion) / source_macs))
    if found and max_compute is not None:
        cheapest = min(c.compute for c in found)
        found = [c for c in found if c.compute <= max_compute]
        if not found:
            raise ValueError(f"--max-compute {max_compute:g}: every layout of {target_params:.0%} of the parameters "
                             f"needs at least {cheapest:.3f}x the teacher's multiply-adds per token; raise "
                             "--max-compute or lower --target-params")
    if not found:
        smallest = RecursionConfig(num_loops=num_layers, strategy=strategy, init=init, lora_rank=0)
        floor = parameter_count(source, smallest) / total
        raise ValueError(f"--target-params {target_params:g} is below the smallest recursive model "
                         f"({floor:.1%} of the teacher's parameters: one shared layer, rank 0)")
    return found


def without_search(source, options: list[Candidate]) -> Candidate:
    """The layout to take when the budget cannot pay for the search: the most loops that still
    share at least 3 layers (10 loops of 3 were the best, or within 1 % of it after training, at
    50 % and 75 % of SmolLM2-135M; see docs/results/layouts.md)."""
    num_layers = _num_layers(source)
    blocks = {id(c): Layout.build(num_layers, c.recursion).block_size for c in options}
    wide = [c for c in options if blocks[id(c)] >= 3]
    return max(wide, key=lambda c: c.loops) if wide else options[0]


@torch.no_grad()
def search(source, calibration: CalibrationStats, tokens: torch.Tensor, options: list[Candidate], seq_len: int,
           damp: float = 0.01, log: Callable[[str], None] = print) -> Candidate:
    """Convert every candidate with `calibration`, score it on `tokens`, return the best."""
    from ..eval.metrics import perplexity
    from .convert import convert

    device = next(source.parameters()).device
    for c in options:
        model = convert(source, c.recursion, progress=False, calibration=calibration, damp=damp).to(device)
        c.ppl = perplexity(model, tokens, context_len=seq_len, stride=seq_len)["ppl"]
        del model
        log(f"      {c.loops:>2} loops, rank {c.rank}: {c.params / 1e6:.1f}M parameters, "
            f"converted ppl {c.ppl:.4g}")
    return min(options, key=lambda c: c.ppl)


__all__ = ["Candidate", "candidates", "capped", "full_ranks", "largest_rank", "search", "without_search"]
