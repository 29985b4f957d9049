"""What both sections of report.md share: the results of the computed cells, number formats,
markdown tables, and the noise level below which a comparison is inconclusive."""

from __future__ import annotations

import math

from .plan import middle_rank

NOISE = 0.02  # relative perplexity difference below which a comparison is inconclusive


def _fmt_ppl(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.1f}" if x < 1e4 else f"{x:.2e}"


def _fmt_params(n) -> str:
    return f"{n / 1e6:.1f}"


class Results:
    def __init__(self, summary: dict):
        self.summary = summary
        self.cells = {c["key"]: c for c in summary["cells"]}
        self.budget = summary["budget"]

    def get(self, key: str) -> dict | None:
        c = self.cells.get(key)
        return c["result"] if c else None

    def ppl(self, key: str) -> float | None:
        r = self.get(key)
        return r["ppl"] if r else None

    def tagged(self, tag: str) -> list[dict]:
        return [c for c in self.summary["cells"] if tag in c["tags"]]

    @property
    def mid_rank(self):
        return middle_rank(self.budget["ranks"])


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _off(x: float, ref: float) -> str:
    """Signed relative difference; a ratio once the two are 10x apart (where -100.0% says nothing)."""
    if x > 0 and ref > 0 and max(x / ref, ref / x) >= 10:
        return f"{ref / x:,.0f}x lower" if x < ref else f"{x / ref:,.0f}x higher"
    return f"{(x - ref) / ref:+.1%}"


def _better(a: float | None, b: float | None) -> bool | None:
    """True if perplexity a is clearly lower than b, False if clearly higher, None within noise."""
    if a is None or b is None:
        return None
    if abs(a - b) <= NOISE * min(a, b):
        return None
    return a < b
