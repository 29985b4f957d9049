"""`recursify report`: the ablation grid, baselines and findings against the paper, in one command.

`plan` says which cells (models) a budget measures, `runner` builds, uptrains and measures them
with a per-cell cache, `render` writes report.md and results.json (the calibrated-conversion
section in `render_calibrated`, the plots in `plots`).
"""

from .plan import BUDGETS, Budget, Cell, plan_cells
from .runner import ReportConfig, ReportError, run_report

__all__ = ["BUDGETS", "Budget", "Cell", "ReportConfig", "ReportError", "plan_cells", "run_report"]
