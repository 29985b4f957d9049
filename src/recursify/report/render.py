"""Turn finished cells into report.md, results.json and three PNG plots (`plots.py`; the
calibrated-conversion section is `render_calibrated.py`).

The findings section compares our numbers with the paper's claims one by one. A difference in
perplexity smaller than `NOISE` (relative) is called inconclusive: a tiny KD budget and a few
thousand held-out tokens cannot resolve more than that.

Each note is a pure verdict computed from the measured numbers (`grid_verdict`, `tokens_seen`: frozen
dataclasses, None where a number was not measured) and a renderer that words it (`render_grid_note`);
tests check the verdicts, and a single test guards the wording.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .plan import Cell
from .plots import PLOTS, plot_all
from .tables import NOISE, Results, _better, _fmt_params, _fmt_ppl, _off, _table  # noqa: F401

FULL_RANK_TOL = 1e-3  # the full-rank conversion is exact: only float rounding may move its perplexity


def _rec(**kw) -> str:
    return Cell(model="recursive", trained=kw.pop("trained", True), **kw).key


# ---------------------------------------------------------------------------------------- tables


def main_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the headline table (teacher, baselines, ours), shared by report.md and the terminal."""
    from ..eval.harness import DISPLAY_NAMES, PAPER_TASKS

    cells = res.tagged("main")
    teacher_params = (res.get("teacher") or {}).get("params")
    tasks = [t for t in PAPER_TASKS if any("paper" in c["result"] for c in cells)]
    header = ["model", "params (M)", "ppl before KD", "ppl after KD", "top-1 agreement"]
    header += [DISPLAY_NAMES[t] for t in tasks] + (["avg (7 tasks)"] if tasks else [])
    rows = []
    for c in cells:
        r = c["result"]
        teacher = c["cell"]["model"] == "teacher"
        share = f" ({r['params'] / teacher_params:.0%})" if teacher_params and not teacher else ""
        row = [c["label"], _fmt_params(r["params"]) + share,
               _fmt_ppl(r["ppl"]) if teacher else _fmt_ppl(r.get("ppl_before")),
               "–" if teacher else _fmt_ppl(r["ppl"]),
               "1.000" if teacher else (f"{r['agreement']:.3f}" if "agreement" in r else "–")]
        paper = r.get("paper")
        row += [f"{100 * paper['tasks'][t]['value']:.1f}" if paper and t in paper["tasks"] else "–" for t in tasks]
        if tasks:
            row.append(f"{100 * paper['average']:.1f}" if paper else "–")
        rows.append(row)
    return header, rows


def main_table(res: Results) -> str:
    header, rows = main_rows(res)
    return _table(header, rows)


def terminal_summary(summary: dict):
    """The headline table and the findings, as rich renderables for the terminal."""
    from rich.table import Table

    res = Results(summary)
    header, rows = main_rows(res)
    keep = [i for i, h in enumerate(header) if i < 5 or h.startswith("avg")]  # per-task columns: see report.md
    header, rows = [header[i] for i in keep], [[row[i] for i in keep] for row in rows]
    table = Table(title=f"recursify report: {summary['model']} (budget {res.budget['name']})")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    from .render_calibrated import calibration_notes

    lines = [f"{f['name']}: {f['verdict'].strip('*')} ({f['ours']})" for f in findings(res)]
    lines += [f"{n['name']}: {n['text']}" for n in calibration_notes(res)]
    return table, lines


def grid_table(res: Results) -> str:
    b = res.budget
    header = ["strategy", "init"] + [f"r={r}" for r in b["ranks"]]
    rows = []
    for s in b["strategies"]:
        for i in b["inits"]:
            rows.append([s, i] + [_fmt_ppl(res.ppl(_rec(strategy=s, init=i, rank=r, trained=False))) for r in b["ranks"]])
    return _table(header, rows)


def _measured(res: Results, keys: dict) -> dict:
    """The perplexities of `keys` (name -> cell key) that were measured; NaN counts as not measured."""
    vals = {name: res.ppl(k) for name, k in keys.items()}
    return {name: v for name, v in vals.items() if v is not None and not math.isnan(v)}


@dataclass(frozen=True)
class FullRank:
    """The exact (full-rank) conversion against the teacher: every measured full-rank cell
    ("strategy init" -> perplexity), and `off`, those further than FULL_RANK_TOL (relative) from the teacher."""

    teacher: float
    cells: dict[str, float]
    off: dict[str, float]

    @property
    def exact(self) -> bool:
        return not self.off

    @property
    def largest(self) -> float:
        """The largest relative difference from the teacher's perplexity."""
        return max(abs(v - self.teacher) for v in self.cells.values()) / self.teacher


@dataclass(frozen=True)
class RankVsZero:
    """Untrained rank `rank` against rank 0, per (strategy, init) pair measured at both: True where rank
    `rank` scores the clearly lower perplexity, False the clearly higher one, None within NOISE."""

    rank: int
    better: dict[tuple[str, str], bool | None]

    wins = property(lambda self: list(self.better.values()).count(True))
    losses = property(lambda self: list(self.better.values()).count(False))
    ties = property(lambda self: list(self.better.values()).count(None))


@dataclass(frozen=True)
class Closest:
    """The cell whose perplexity is closest to the teacher's; `within`: no further than NOISE (relative)."""

    cell: str
    ppl: float
    teacher: float

    @property
    def within(self) -> bool:
        return abs(self.ppl - self.teacher) <= NOISE * self.teacher


@dataclass(frozen=True)
class Uptraining:
    """KD on the truncated-SVD cells measured before and after it: per cell, True where KD clearly lowers
    the perplexity, False where it clearly raises it, None within NOISE; the cell closest to the teacher
    after KD and its untrained perplexity `start` (both None where the teacher was not measured)."""

    moved: dict[str, bool | None]
    closest: Closest | None = None
    start: float | None = None

    lowers = property(lambda self: list(self.moved.values()).count(True))
    raises = property(lambda self: list(self.moved.values()).count(False))

    @property
    def recovers(self) -> bool | None:
        """The closest cell after KD is within NOISE of the teacher; None: the teacher was not measured."""
        return None if self.closest is None else self.closest.within


@dataclass(frozen=True)
class GridVerdict:
    """What the untrained grid (and KD on its truncated-SVD cells) shows; None where it was not measured."""

    full_rank: FullRank | None
    rank_vs_zero: RankVsZero | None
    untrained: Closest | None  # the untrained truncated-SVD cell closest to the teacher
    uptraining: Uptraining | None


def _closest(vals: dict[str, float], teacher: float | None) -> Closest | None:
    if not vals or not teacher:
        return None
    n = min(vals, key=lambda k: abs(vals[k] - teacher))
    return Closest(n, vals[n], teacher)


def grid_verdict(res: Results) -> GridVerdict:
    """The grid's verdicts from the measured perplexities (pure: report.md's wording is `render_grid_note`)."""
    b, teacher = res.budget, res.ppl("teacher")
    pairs = [(s, i) for s in b["strategies"] for i in b["inits"]]
    full = _measured(res, {f"{s} {i}": _rec(strategy=s, init=i, rank="full", trained=False) for s, i in pairs})
    full_rank = None if not full or not teacher else FullRank(
        teacher, full, {n: v for n, v in full.items() if not abs(v - teacher) <= FULL_RANK_TOL * teacher})
    low = [r for r in b["ranks"] if r not in (0, "full")]
    rank_vs_zero = None
    if low:
        r0, r1 = (_measured(res, {p: _rec(strategy=p[0], init=p[1], rank=r, trained=False) for p in pairs}) for r in (0, low[0]))
        better = {p: _better(r1[p], r0[p]) for p in pairs if p in r0 and p in r1}
        rank_vs_zero = RankVsZero(low[0], better) if better else None
    keys = {f"{s} {i} r={r}": (s, i, r) for s, i in pairs for r in low}
    before = _measured(res, {n: _rec(strategy=s, init=i, rank=r, trained=False) for n, (s, i, r) in keys.items()})
    after = _measured(res, {n: _rec(strategy=s, init=i, rank=r) for n, (s, i, r) in keys.items()})
    paired = [n for n in keys if n in before and n in after]
    uptraining = None
    if paired:
        closest = _closest({n: after[n] for n in paired}, teacher)
        uptraining = Uptraining({n: _better(after[n], before[n]) for n in paired}, closest,
                                None if closest is None else before[closest.cell])
    return GridVerdict(full_rank, rank_vs_zero, _closest(before, teacher), uptraining)


def render_grid_note(v: GridVerdict) -> str:
    """The grid's verdicts as report.md's sentences (nothing for what was not measured)."""
    notes = []
    if (f := v.full_rank) and f.exact:
        notes.append(f"Full rank reproduces the teacher's perplexity ({_fmt_ppl(f.teacher)}) within {FULL_RANK_TOL:.0e} "
                     f"(relative) in all {len(f.cells)} cells (largest difference {f.largest:.1e}), "
                     "which checks the conversion itself.")
    elif f:
        listed = ", ".join(f"{n} {_fmt_ppl(x)} ({_off(x, f.teacher)})" for n, x in f.off.items())
        notes.append(f"Full rank does not reproduce the teacher's perplexity ({_fmt_ppl(f.teacher)}) within "
                     f"{FULL_RANK_TOL:.0e} (relative) in {len(f.off)} of {len(f.cells)} cells: {listed}; "
                     "the conversion is not exact there.")
    if r := v.rank_vs_zero:
        notes.append(f"Before uptraining, rank {r.rank} scores a lower perplexity than rank 0 in {r.wins} "
                     f"of {len(r.better)} (strategy, init) pairs and a higher one in {r.losses}"
                     + (f" ({r.ties} within {NOISE:.0%})." if r.ties else "."))
    if c := v.untrained:
        notes.append(f"Without training, the truncated-SVD cell closest to the teacher is {c.cell} at {_fmt_ppl(c.ppl)} "
                     f"against the teacher's {_fmt_ppl(c.teacher)} ({_off(c.ppl, c.teacher)}): the SVD of the residuals "
                     + (f"alone recovers the teacher within {NOISE:.0%}." if c.within else "alone does not recover the teacher."))
    if u := v.uptraining:
        text = (f"Uptraining with KD lowers perplexity in {u.lowers} of the {len(u.moved)} truncated-SVD cells "
                f"measured before and after it and raises it in {u.raises}")
        if c := u.closest:
            text += (f"; the closest to the teacher afterwards, {c.cell} ({_fmt_ppl(u.start)} → {_fmt_ppl(c.ppl)}, "
                     f"{_off(c.ppl, c.teacher)} against the teacher's {_fmt_ppl(c.teacher)}), "
                     + (f"is within {NOISE:.0%}, so uptraining recovers the teacher" if u.recovers
                        else f"is not within {NOISE:.0%}, so uptraining does not recover the teacher"))
        notes.append(text + ".")
    return " ".join(notes)


def grid_note(res: Results) -> str:
    """What the untrained grid shows, stated from its numbers (nothing where they were not measured)."""
    return render_grid_note(grid_verdict(res))


def trained_table(res: Results) -> str:
    keys = []
    for tag in ("grid_trained", "strategy", "init_recursive", "init_relaxed", "lora_init", "kd", "rank"):
        keys += [c["key"] for c in res.tagged(tag) if c["key"] not in keys]
    rows = []
    for k in keys:
        c = res.cells[k]
        r = c["result"]
        exits = " / ".join(_fmt_ppl(x) for x in r.get("exit_ppl", [])) or "–"
        rows.append([c["label"], _fmt_params(r["params"]), _fmt_ppl(r["ppl"]), exits,
                     f"{r['agreement']:.3f}" if "agreement" in r else "–", f"{r.get('train_seconds', 0):.0f}"])
    return _table(["model (after KD)", "params (M)", "ppl", "ppl per exit (loop 1 / 2 …)", "top-1 agreement",
                   "train s"], rows)


def exit_table(res: Results) -> str:
    """Per schedule: per-exit perplexity, then (mean loops, agreement) at each confidence threshold."""
    taus = (0.2, 0.4, 0.6, 0.8)
    rows = []
    for c in res.tagged("exits"):
        r = c["result"]
        curve = {round(p["threshold"], 2): p for p in r.get("exit_curve", [])}
        rows.append([c["cell"]["exit_schedule"], " / ".join(_fmt_ppl(x) for x in r.get("exit_ppl", []))]
                    + [f"{curve[t]['mean_loops']:.2f} / {curve[t]['agreement']:.3f}" if t in curve else "–" for t in taus])
    return _table(["exit loss", "ppl per exit"] + [f"conf ≥ {t}: loops / agreement" for t in taus], rows)


# -------------------------------------------------------------------------------------- findings


def _verdict(ours_better: bool | None) -> str:
    return {True: "**agrees**", False: "**disagrees**", None: "inconclusive"}[ours_better]


def _best(res: Results, keys: dict[str, str]) -> tuple[str | None, str]:
    vals = {name: res.ppl(k) for name, k in keys.items() if res.ppl(k) is not None}
    if not vals:
        return None, "not measured"
    ranked = sorted(vals, key=vals.get)
    text = ", ".join(f"{n} {_fmt_ppl(vals[n])}" for n in ranked)
    if len(ranked) > 1 and abs(vals[ranked[0]] - vals[ranked[1]]) <= NOISE * vals[ranked[0]]:
        return None, text
    return ranked[0], text


def findings(res: Results) -> list[dict]:
    r = res.mid_rank
    out = []

    cyc, seq = res.ppl(_rec(strategy="cycle", init="stepwise", rank=0)), res.ppl(_rec(strategy="sequence", init="stepwise", rank=0))
    out.append({"name": "CYCLE vs SEQUENCE", "paper": "CYCLE sharing beats SEQUENCE sharing.",
                "ours": f"recursive r=0, stepwise, after KD: cycle {_fmt_ppl(cyc)} vs sequence {_fmt_ppl(seq)}",
                "verdict": _verdict(_better(cyc, seq))})

    best, text = _best(res, {i: _rec(strategy="cycle", init=i, rank=0) for i in res.budget["inits"]})
    out.append({"name": "Initialisation of the recursive model", "paper": "Stepwise is the best init for the plain recursive model.",
                "ours": f"cycle r=0 after KD: {text}", "verdict": _verdict(None if best is None else best == "stepwise")})

    best, text = _best(res, {i: _rec(strategy="cycle", init=i, rank=r) for i in res.budget["inits"]})
    out.append({"name": "Initialisation of the relaxed model", "paper": "Average is the best init once LoRA relaxes the sharing.",
                "ours": f"cycle r={r} after KD: {text}", "verdict": _verdict(None if best is None else best == "average")})

    svd, zero = res.ppl(_rec(strategy="cycle", init="average", rank=r)), res.ppl(_rec(strategy="cycle", init="average", rank=r, lora_init="zero"))
    out.append({"name": "SVD vs zero LoRA init", "paper": "Initialising LoRA from the SVD of the residual beats zero init.",
                "ours": f"cycle average r={r} after KD: SVD {_fmt_ppl(svd)} vs zero {_fmt_ppl(zero)}",
                "verdict": _verdict(_better(svd, zero))})

    kd, lm = res.ppl(_rec(strategy="cycle", init="stepwise", rank=0)), res.ppl(_rec(strategy="cycle", init="stepwise", rank=0, objective="lm"))
    out.append({"name": "Knowledge distillation", "paper": "Uptraining with KD from the original model beats the LM loss alone.",
                "ours": f"cycle stepwise r=0, same tokens: KD {_fmt_ppl(kd)} vs LM only {_fmt_ppl(lm)}",
                "verdict": _verdict(_better(kd, lm))})

    ex = {c["cell"]["exit_schedule"]: c["result"] for c in res.tagged("exits")}
    if {"none", "aggressive"} <= set(ex) and all("exit_ppl" in x for x in ex.values()):
        first = {k: v["exit_ppl"][0] for k, v in ex.items()}
        last = {k: v["exit_ppl"][-1] for k, v in ex.items()}
        helps_exit = _better(first["aggressive"], first["none"])
        keeps_final = None
        if "weighted" in ex:
            keeps_final = _better(last["aggressive"], last["weighted"])
            if keeps_final is None:  # within noise of weighted is fine if the exit itself improved
                keeps_final = True if helps_exit else None
        verdict = None if helps_exit is None else (helps_exit and keeps_final is not False)
        text = "; ".join(f"{k}: loop 1 {_fmt_ppl(first[k])}, final {_fmt_ppl(last[k])}" for k in ex)
        out.append({"name": "Early-exit loss weights",
                    "paper": "Aggressive weights (small on intermediate loops, 1 on the last) make early exits usable "
                             "while keeping the final loop closer to its quality than proportional weights.",
                    "ours": text, "verdict": _verdict(verdict)})

    rec0 = res.ppl(_rec(strategy="cycle", init="stepwise", rank=0))
    trunc, subset = res.ppl("truncated-kd"), res.ppl("layer_subset-kd")
    base = min([x for x in (trunc, subset) if x is not None], default=None)
    out.append({"name": "Recursive vs parameter-matched baselines",
                "paper": "The recursive model beats plain models of the same size (truncated / fewer layers) after the same uptraining.",
                "ours": f"recursive r=0 {_fmt_ppl(rec0)} vs truncated {_fmt_ppl(trunc)}, K stepwise layers {_fmt_ppl(subset)}",
                "verdict": _verdict(_better(rec0, base))})

    ranks = [x for x in res.budget["ranks"] if x != "full"]
    vals = [(x, res.ppl(_rec(strategy="cycle", init="average" if x else "stepwise", rank=x))) for x in ranks]
    vals = [(x, v) for x, v in vals if v is not None]
    if len(vals) > 1:
        mono = all(not _better(vals[i][1], vals[i + 1][1]) for i in range(len(vals) - 1))
        out.append({"name": "Relaxation (LoRA rank)", "paper": "Higher LoRA rank brings the model closer to the original.",
                    "ours": "after KD: " + ", ".join(f"r={x} {_fmt_ppl(v)}" for x, v in vals)
                            + ("" if mono else " (not monotone in between)"),
                    "verdict": _verdict(_better(vals[-1][1], vals[0][1]))})
    return out


# ---------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class TokensSeen:
    """The training-token counts the trained cells recorded (sorted, each once), against the budget's."""

    seen: tuple[int, ...]
    budget: int

    @property
    def same(self) -> bool | None:
        """Every trained cell, baselines included, saw the budget's tokens; None: no cell recorded any."""
        return self.seen == (self.budget,) if self.seen else None


def tokens_seen(res: Results) -> TokensSeen:
    seen = sorted({c["result"]["train_tokens"] for c in res.summary["cells"] if "train_tokens" in c["result"]})
    return TokensSeen(tuple(seen), res.budget["train_tokens"])


def benchmarks_run(res: Results) -> bool:
    return any("paper" in c["result"] for c in res.summary["cells"])


def _tokens_note(t: TokensSeen) -> str:
    if t.same is None:
        return ""
    return ", the same for every baseline" if t.same else "; the trained cells saw " + ", ".join(f"{x:,}" for x in t.seen) + " tokens"


def render_markdown(res: Results, command: str) -> str:
    from .render_calibrated import calibration_section

    s, b = res.summary, res.budget
    lines = [f"# recursify report: {s['model']}, budget `{b['name']}`", ""]
    lines += [f"Regenerate: `{command}`", ""]
    limit = "all items" if b["task_limit"] is None else f"the first {b['task_limit']} items of each task"
    lines += [
        f"- {b['num_loops']} loops; {b['train_tokens']:,} KD tokens per trained model (batch {b['batch_size']} x "
        f"{b['seq_len']}, lr {b['lr']}){_tokens_note(tokens_seen(res))}.",
        f"- Perplexity: strided sliding window (context {b['eval_context']}, stride {b['eval_context'] // 2}) over "
        f"{s['heldout_tokens']:,} held-out tokens of {', '.join(s['heldout'])}; training text: {', '.join(s['data'])}.",
        f"- Benchmarks: the paper's seven tasks through lm-evaluation-harness, zero-shot, {limit}."
        if benchmarks_run(res) else "- Benchmarks: not run.",
        f"- Held-out sequences found in the training data: {s['overlap_sequences']}.",
        f"- {len(s['cells'])} cells; computing them took {sum(c['seconds'] for c in s['cells']) / 60:.0f} minutes "
        f"({len(s.get('computed', []))} computed by the latest run, the rest reused from `cells/`); "
        f"{platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "## Teacher, baselines and recursive models",
        "",
        main_table(res),
        "",
        f"![perplexity vs parameters]({PLOTS['ppl_vs_params']})",
        "",
        "## Findings against the paper",
        "",
        f"A perplexity difference under {NOISE:.0%} is called inconclusive.",
        "",
    ]
    for f in findings(res):
        lines += [f"- **{f['name']}** — {f['verdict']}", f"  - paper: {f['paper']}", f"  - ours: {f['ours']}"]
    lines += ["", "## Conversion alone (no training): held-out perplexity", "", grid_table(res), "",
              grid_note(res), "",
              "## After KD", "", trained_table(res), "", f"![perplexity during uptraining]({PLOTS['ppl_vs_tokens']})", ""]
    lines += calibration_section(res)
    lines += ["## Early-exit recipes", "", exit_table(res), "", f"![exit depth vs agreement]({PLOTS['exit_vs_agreement']})", ""]
    return "\n".join(lines)


def write_report(summary: dict, out: Path, command: str) -> Path:
    from .render_calibrated import calibration_notes

    out.mkdir(parents=True, exist_ok=True)
    res = Results(summary)
    plot_all(res, out)
    (out / "results.json").write_text(json.dumps({**summary, "findings": findings(res), "calibration_notes": calibration_notes(res)},
                                                 indent=1, default=str))
    path = out / "report.md"
    path.write_text(render_markdown(res, command))
    return path
