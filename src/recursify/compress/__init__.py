"""`recursify compress`: the one-command recipe, from a pretrained model to a usable smaller one.

`config.py` holds the request (`CompressConfig`, `CompressError`), `plan.py` the pure time planner
(which work fits the budget), `state.py` the resume record (`RunState`), `run.py` the executor
(`compress`) and `summary.py` the final measurements and summary.md.
"""

from .config import CompressConfig, CompressError, parse_duration
from .run import compress
from .summary import render_summary

__all__ = ["CompressConfig", "CompressError", "compress", "parse_duration", "render_summary"]
