"""The calibrated-conversion section of report.md: plain vs calibrated conversion, local distillation
+ KD vs KD alone, uniform vs allocated ranks at the same parameter count, each before and after
training, and notes stated from the measured numbers (nothing where a cell was not measured).
"""

from __future__ import annotations

import math

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


def _pair(a: float, b: float, other: str) -> str:
    return f"{_fmt_ppl(a)} against {other}'s {_fmt_ppl(b)} ({_off(a, b)})"


def _tokens(r: dict) -> tuple[int, int]:
    """(local-distillation tokens, KD tokens) a trained cell saw."""
    local = r.get("local_tokens", 0)
    return local, r.get("kd_tokens", r.get("train_tokens", 0) - local)


def calibration_notes(res: Results) -> list[dict]:
    """One note per comparison that was measured: {"name", "text", "better"} where `better` says whether
    the calibrated / local / allocated side has the clearly lower perplexity (None: within NOISE)."""
    m, notes = _measured(res), []
    ppl = {name: r["ppl"] for name, r in m.items()}
    if {"plain", "calibrated"} <= set(ppl):
        better, whose = _better(ppl["calibrated"], ppl["plain"]), "the converted model's"
        text = (f"Before training, the calibrated conversion scores "
                f"{_pair(ppl['calibrated'], ppl['plain'], 'the plain SVD conversion')}: "
                f"{_effect(better, 'calibration', whose)}.")
        notes.append({"name": "Calibrated vs plain conversion, untrained", "text": text, "better": better})
    if {"plain_kd", "calibrated_kd"} <= set(ppl):
        better = _better(ppl["calibrated_kd"], ppl["plain_kd"])
        before = _better(ppl.get("calibrated"), ppl.get("plain")) if {"plain", "calibrated"} <= set(ppl) else None
        text = (f"After {m['calibrated_kd'].get('train_tokens', 0):,} KD tokens each, the calibrated start ends at "
                f"{_pair(ppl['calibrated_kd'], ppl['plain_kd'], 'the plain one')}: "
                + {True: "the calibrated start is still ahead", False: "the plain conversion ends ahead",
                   None: f"the two end within {NOISE:.0%} of each other"}[better]
                + (", so training erases the calibrated start's lead." if before and better is None else "."))
        notes.append({"name": "Calibrated vs plain conversion, after KD", "text": text, "better": better})
    if {"local_kd", "calibrated_kd"} <= set(ppl):
        better = _better(ppl["local_kd"], ppl["calibrated_kd"])
        local, kd = _tokens(m["local_kd"])
        total = local + kd
        text = (f"Spending {local:,} of {total:,} training tokens ({local / max(total, 1):.0%}) on local distillation "
                f"before KD scores {_pair(ppl['local_kd'], ppl['calibrated_kd'], 'KD alone')} "
                f"(on {m['calibrated_kd'].get('train_tokens', 0):,} tokens), both from the same calibrated conversion: "
                f"{_effect(better, 'local distillation')} at this budget.")
        notes.append({"name": "Local distillation + KD vs KD", "text": text, "better": better})
    if {"allocated", "calibrated"} <= set(ppl):
        pa, pu = m["allocated"].get("params"), m["calibrated"].get("params")
        size = (f"{_fmt_params(pa)}M parameters against the uniform rank's {_fmt_params(pu)}M ({pa - pu:+,})"
                if pa is not None and pu is not None else "parameters not recorded")
        text = (f"Ranks allocated per linear hold {size}; before training they score "
                f"{_pair(ppl['allocated'], ppl['calibrated'], 'the calibrated uniform rank')}")
        better = _better(ppl["allocated"], ppl["calibrated"])
        if {"allocated_kd", "calibrated_kd"} <= set(ppl):
            better = _better(ppl["allocated_kd"], ppl["calibrated_kd"])
            text += f", after KD {_pair(ppl['allocated_kd'], ppl['calibrated_kd'], 'the uniform rank')}"
            what = "allocating the ranks (after KD)"
        else:
            what = "allocating the ranks (untrained)"
        text += f": {_effect(better, what)}."
        notes.append({"name": "Allocated vs uniform ranks", "text": text, "better": better})
    return notes


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


def calibration_section(res: Results) -> list[str]:
    """The section's markdown lines; none when no calibration cell was measured."""
    cells = calibration_cells(res.budget["ranks"])
    if not _measured(res):
        return []
    b, mid = res.budget, cells["plain"].rank
    calib = b.get("calib_tokens")
    seen = sorted({res.get(c.key)["train_tokens"] for c in cells.values()
                   if res.get(c.key) and "train_tokens" in res.get(c.key)})
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
