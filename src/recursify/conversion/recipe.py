"""The calibrated conversion recipe, in one place for `recursify convert`, `compress` and the report.

statistics -> (optionally) the teacher's output curvature -> (optionally) per-linear ranks for a
parameter budget -> `convert(calibration=)` -> (optionally) the sequential refit. Gathering the
statistics and choosing the fit tokens stay with the caller (each has its own cache and budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..config import RecursionConfig
from ..modeling import RecursiveForCausalLM
from .allocate import allocate_ranks, parameter_count
from .calibrate import CalibrationStats
from .convert import convert
from .curvature import with_curvature
from .sequential import sequential_calibrate


def calibrated_convert(
    teacher,
    recursion: RecursionConfig,
    stats: CalibrationStats,
    fit_seqs: torch.Tensor | None = None,
    *,
    sequential: bool = False,
    curvature: bool = False,
    allocate_to: float | str | None = None,
    damp: float = 0.01,
    device: str | torch.device | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    announce: Callable[[RecursionConfig], None] | None = None,
) -> RecursiveForCausalLM:
    """Convert `teacher` per `recursion` with its calibration statistics `stats`; returns the student,
    whose `recursion` holds the final layout (with `rank_pattern` when ranks were allocated).

    - `curvature`: first attach the teacher's output curvature on `fit_seqs` (cached), so the fits
      (and the allocation) weigh output directions by what the model's predictions notice.
    - `allocate_to`: per-linear ranks (a `rank_pattern`, uniform rank 0) for this fraction of the
      teacher's parameters, or "same" for the size `recursion`'s uniform rank has (at most 1).
    - `sequential`: then refit the LoRA position by position on the student's own inputs (`fit_seqs`).
    - `device`: where the student goes after conversion (default: the teacher's), before the refit.
    - `log` gets the lines for the curvature and the allocated ranks; `announce` is called with the
      final recursion just before the conversion starts.
    """
    if (sequential or curvature) and fit_seqs is None:
        raise ValueError("the sequential refit and the output curvature need fit_seqs")
    say = log or (lambda line: None)
    if curvature:
        say(f"output curvature of the teacher on {fit_seqs.numel()} tokens")
        stats = with_curvature(stats, teacher, fit_seqs, progress=progress)
    if allocate_to is not None:
        if allocate_to == "same":
            target = min(1.0, parameter_count(teacher, recursion) / sum(p.numel() for p in teacher.parameters()))
        elif isinstance(allocate_to, str):
            raise ValueError(f"allocate_to is a fraction of the teacher's parameters or 'same', got {allocate_to!r}")
        else:
            target = allocate_to
        ranks = allocate_ranks(teacher, recursion, stats, target, damp=damp)
        recursion = dataclasses.replace(recursion, lora_rank=0, rank_pattern=ranks)
        say(f"ranks for {target:.1%} of the teacher's parameters, per linear: {recursion.rank_text}")
    if announce is not None:
        announce(recursion)
    student = convert(teacher, recursion, progress=progress, calibration=stats, damp=damp, device=device)
    if sequential:
        sequential_calibrate(student, teacher, fit_seqs, damp=damp, progress=progress, curvature=stats.curvature)
    return student


__all__ = ["calibrated_convert"]
