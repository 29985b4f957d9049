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
- `layer_math.py`: the model's weight-free math (norms, RoPE, masks, attention).

The names `convert` and `calibrate` here are the modules; the functions are
`recursify.convert` and `conversion.calibrate.calibrate`.
"""

from __future__ import annotations

from importlib import import_module

# Public name -> its module, imported on first use: the model imports the leaf `layer_math`, which
# runs this file first, and eager imports here would load `convert` (which imports the model) from
# inside the model's own import.
_EXPORTS = {
    "allocate_ranks": "allocate", "macs_per_token": "allocate", "parameter_count": "allocate",
    "layer_subset": "baselines", "matched": "baselines", "truncated": "baselines",
    "CalibrationError": "calibrate", "CalibrationStats": "calibrate", "activation_aware_factors": "calibrate",
    "cached_stats": "calibrate", "calibration_sequences": "calibrate", "collect_stats": "calibrate",
    "cached_curvature": "curvature", "collect_curvature": "curvature", "with_curvature": "curvature",
    "Candidate": "layout_search", "candidates": "layout_search", "search": "layout_search",
    "without_search": "layout_search",
    "calibrated_convert": "recipe",
    "sequential_calibrate": "sequential",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [  # = _EXPORTS' keys (tests/test_recipe.py checks)
    "CalibrationError", "CalibrationStats", "Candidate", "activation_aware_factors", "allocate_ranks",
    "cached_curvature", "cached_stats", "calibrated_convert", "calibration_sequences", "candidates",
    "collect_curvature", "collect_stats", "layer_subset", "macs_per_token", "matched", "parameter_count",
    "search", "sequential_calibrate", "truncated", "with_curvature", "without_search",
]
