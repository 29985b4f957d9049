"""The calibrated-conversion section of report.md: plain vs calibrated conversion, local distillation
+ KD vs KD alone, uniform vs allocated ranks at the same parameter count, each before and after
training, and notes stated from the measured numbers (nothing where a cell was not measured):
`calibration_verdicts` computes each comparison's numbers and verdict, `render_verdict` words it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .plan import calibration_cells
from .tables import NOISE, Results, _better, _fmt_params, _fmt_ppl, _off, _table

# table rows: label, the untrained cell, the trained cell (names of `plan.calibration_cells`)
ROWS = (("plain SVD conversion", "plain", "plain_kd"),
        ("calibrated conversion + sequential refit", "calibrated", "calibrated_kd"),
        ("calibrated, then local distillation + KD", "calibrated", "local_kd"),
        ("allocated ranks (same parameters), calibrated", "allocated", "allocated_kd"))


def _measured(res: Results) -> dict[str, dict]:
    """Name -> result of the calibration cells whose perplexity was measured."""
    out = {}
    for name, cell in calibration_cells(res.budget["ranks"]).items():
        r = res.get(cell.key)
        if r is not None and r.get("ppl") is not None and not math.isnan(r["ppl"]):
            out[name] = r
    return out


def _effect(better: bool | None, what: str, whose: str = "the") -> str:
    return {True: f"{what} lowers {whose} perplexity", False: f"{what} raises {whose} perplexity",
            None: f"{what} moves {whose} perplexity by less than {NOISE:.0%}"}[better]


def _pair(p: Pair, other: str) -> str:
    return f"{_fmt_ppl(p.ours)} against {other}'s {_fmt_ppl(p.ref)} ({_off(p.ours, p.ref)})"


def _tokens(r: dict) -> tuple[int, int]:
    """(local-distillation tokens, KD tokens) a trained cell saw."""
    local = r.get("local_tokens", 0)
    return local, r.get("kd_tokens", r.get("train_tokens", 0) - local)


# ------------------------------------------------------------------ verdicts (pure) and their sentences


@dataclass(frozen=True)
class Pair:
    """Two measured perplexities: `ours` (the calibrated / local-distillation / allocated side) and `ref`."""

    ours: float
    ref: float

    @property
    def better(self) -> bool | None:
        """`ours` clearly lower (True), clearly higher (False), within NOISE (None)."""
        return _better(self.ours, self.ref)


@dataclass(frozen=True)
class CalibratedUntrained:
    """The calibrated conversion against the plain SVD conversion, before training."""

    name: ClassVar[str] = "Calibrated vs plain conversion, untrained"
    ppl: Pair
    better = property(lambda self: self.ppl.better)


@dataclass(frozen=True)
class CalibratedAfterKD:
    """Both conversions after the same KD (`tokens` each); `untrained`: the comparison before it (None:
    not measured); `lead_erased`: the calibrated start was clearly ahead and ends within NOISE."""

    name: ClassVar[str] = "Calibrated vs plain conversion, after KD"
    ppl: Pair
    untrained: Pair | None
    tokens: int
    better = property(lambda self: self.ppl.better)

    @property
    def lead_erased(self) -> bool:
        return self.untrained is not None and self.untrained.better is True and self.better is None


@dataclass(frozen=True)
class LocalVsKD:
    """Local distillation + KD (`local_tokens` + `kd_tokens`) against KD alone (`ref_tokens`), both from
    the same calibrated conversion."""

    name: ClassVar[str] = "Local distillation + KD vs KD"
    ppl: Pair
    local_tokens: int
    kd_tokens: int
    ref_tokens: int
    better = property(lambda self: self.ppl.better)


@dataclass(frozen=True)
class AllocatedVsUniform:
    """Ranks allocated per linear (`params`) against the calibrated uniform rank (`ref_params`), untrained
    and, where measured, after KD; `better` is the last one measured."""

    name: ClassVar[str] = "Allocated vs uniform ranks"
    untrained: Pair
    trained: Pair | None
    params: float | None
    ref_params: float | None
    better = property(lambda self: (self.trained or self.untrained).better)


Verdict = CalibratedUntrained | CalibratedAfterKD | LocalVsKD | AllocatedVsUniform


def calibration_verdicts(res: Results) -> list[Verdict]:
    """One verdict per comparison that was measured (none for a comparison missing a cell)."""
    m, out = _measured(res), []
    ppl = {name: r["ppl"] for name, r in m.items()}
    pair = lambda a, b: Pair(ppl[a], ppl[b]) if {a, b} <= set(ppl) else None  # noqa: E731
    if untrained := pair("calibrated", "plain"):
        out.append(CalibratedUntrained(untrained))
    if trained := pair("calibrated_kd", "plain_kd"):
        out.append(CalibratedAfterKD(trained, untrained, m["calibrated_kd"].get("train_tokens", 0)))
    if local := pair("local_kd", "calibrated_kd"):
        out.append(LocalVsKD(local, *_tokens(m["local_kd"]), m["calibrated_kd"].get("train_tokens", 0)))
    if alloc := pair("allocated", "calibrated"):
        out.append(AllocatedVsUniform(alloc, pair("allocated_kd", "calibrated_kd"), m["allocated"].get("params"),
                                      m["calibrated"].get("params")))
    return out


def render_verdict(v: Verdict) -> str:
    """A verdict as report.md's sentence."""
    if isinstance(v, CalibratedUntrained):
        whose = "the converted model's"
        return (f"Before training, the calibrated conversion scores {_pair(v.ppl, 'the plain SVD conversion')}: "
                f"{_effect(v.better, 'calibration', whose)}.")
    if isinstance(v, CalibratedAfterKD):
        return (f"After {v.tokens:,} KD tokens each, the calibrated start ends at {_pair(v.ppl, 'the plain one')}: "
                + {True: "the calibrated start is still ahead", False: "the plain conversion ends ahead",
                   None: f"the two end within {NOISE:.0%} of each other"}[v.better]
                + (", so training erases the calibrated start's lead." if v.lead_erased else "."))
    if isinstance(v, LocalVsKD):
        total = v.local_tokens + v.kd_tokens
        return (f"Spending {v.local_tokens:,} of {total:,} training tokens ({v.local_tokens / max(total, 1):.0%}) on local "
                f"distillation before KD scores {_pair(v.ppl, 'KD alone')} (on {v.ref_tokens:,} tokens), both from the "
                f"same calibrated conversion: {_effect(v.better, 'local distillation')} at this budget.")
    pa, pu = v.params, v.ref_params
    size = (f"{_fmt_params(pa)}M parameters against the uniform rank's {_fmt_params(pu)}M ({pa - pu:+,})"
            if pa is not None and pu is not None else "parameters not recorded")
    text = (f"Ranks allocated per linear hold {size}; before training they score "
            f"{_pair(v.untrained, 'the calibrated uniform rank')}")
    if v.trained:
        text += f", after KD {_pair(v.trained, 'the uniform rank')}"
    return text + f": {_effect(v.better, 'allocating the ranks (after KD)' if v.trained else 'allocating the ranks (untrained)')}."


def calibration_notes(res: Results) -> list[dict]:
    """One note per comparison that was measured: {"name", "text", "better"} where `better` says whether
    the calibrated / local / allocated side has the clearly lower perplexity (None: within NOISE)."""
    return [{"name": v.name, "text": render_verdict(v), "better": v.better} for v in calibration_verdicts(res)]


def calibration_table(res: Results) -> str:
    m = _measured(res)
    rows = []
    for label, before, after in ROWS:
        if before not in m and after not in m:
            continue
        r0, r1 = m.get(before, {}), m.get(after, {})
        params = r1.get("params", r0.get("params"))
        if after in m:
            local, kd = _tokens(r1)
            tokens = f"{local:,} + {kd:,}"
        else:
            tokens = "–"
        rows.append([label, _fmt_params(params) if params is not None else "–", _fmt_ppl(r0.get("ppl")),
                     _fmt_ppl(r1.get("ppl")), f"{r1['agreement']:.3f}" if "agreement" in r1 else "–", tokens])
    return _table(["model", "params (M)", "ppl, converted", "ppl after training", "top-1 agreement",
                   "training tokens (local + KD)"], rows)


def trained_tokens(res: Results) -> tuple[int, ...]:
    """The training-token counts the section's cells recorded (sorted, each once): equal when one."""
    found = (res.get(c.key) for c in calibration_cells(res.budget["ranks"]).values())
    return tuple(sorted({r["train_tokens"] for r in found if r and "train_tokens" in r}))


def calibration_section(res: Results) -> list[str]:
    """The section's markdown lines; none when no calibration cell was measured."""
    if not _measured(res):
        return []
    b, mid = res.budget, calibration_cells(res.budget["ranks"])["plain"].rank
    calib = b.get("calib_tokens")
    seen = trained_tokens(res)
    same = (f"every trained row saw {seen[0]:,} training tokens" if len(seen) == 1 else
            "the trained rows saw " + ", ".join(f"{t:,}" for t in seen) + " training tokens, not the same number"
            if seen else "no row was trained")
    lines = [f"## Calibrated conversion (r={mid}, cycle, average init)", "",
             f"Tokens are the report's budget currency: {same} (local-distillation tokens included; the budget gives "
             f"{b['train_tokens']:,} to every trained cell). "
             + (f"Calibration reads {calib:,} further tokens of the training data (teacher forwards for the activation "
                f"statistics, no gradient step; the sequential refit runs on the first "
                f"{b.get('sequential_fraction', 0.5):.0%} of them); they are preparation, not training tokens. "
                if calib else "")
             + f"The allocated row spends the parameters of uniform r={mid} with ranks chosen per linear.", "",
             calibration_table(res), ""]
    lines += [f"- **{n['name']}**: {n['text']}" for n in calibration_notes(res)]
    return lines + [""]
