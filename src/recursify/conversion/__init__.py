"""Conversion: a pretrained decoder -> a `RecursiveForCausalLM`, before any training.

The pipeline, each step usable alone:

- `calibrate.py`: activation statistics of the teacher's linears on real text (cached), and the
  closed forms that use them (`activation_aware_factors`, `fit_shared`);
- `curvature.py`: the teacher's output-side curvature (K-FAC's gradient covariance), for fits
  weighted on both sides;
- `allocate.py`: per-linear ranks for a parameter budget, and parameter / multiply-add counts;
- `convert.py`: the conversion itself (shared-weight init per slot, SVD or calibrated LoRA init);
  `recursify.convert` is its `convert`;
- `sequential.py`: the position-by-position refit of the LoRA on the student's own inputs;
- `recipe.py`: `calibrated_convert`, the recipe the CLI, `compress` and the report share:
  statistics -> curvature -> ranks -> convert -> sequential refit;
- `layout_search.py`: the loop count and rank for a budget (every fitting layout converted and
  scored); `baselines.py`: the parameter-matched plain models a conversion is compared with;

The names `convert` and `calibrate` here are the modules; the functions are
`recursify.convert` and `conversion.calibrate.calibrate`.
"""

from __future__ import annotations

from .allocate import allocate_ranks, macs_per_token, parameter_count
from .baselines import layer_subset, matched, truncated
from .calibrate import (CalibrationError, CalibrationStats, activation_aware_factors, cached_stats,
                        calibration_sequences, collect_stats)
from .curvature import cached_curvature, collect_curvature, with_curvature
from .layout_search import Candidate, candidates, search, without_search
from .recipe import calibrated_convert
from .sequential import sequential_calibrate

__all__ = [
    "CalibrationError", "CalibrationStats", "Candidate", "activation_aware_factors", "allocate_ranks",
    "cached_curvature", "cached_stats", "calibrated_convert", "calibration_sequences", "candidates",
    "collect_curvature", "collect_stats", "layer_subset", "macs_per_token", "matched", "parameter_count",
    "search", "sequential_calibrate", "truncated", "with_curvature", "without_search",
]
