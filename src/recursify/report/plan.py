"""What a report measures: budgets and the cells of the ablation grid.

A *cell* is one model to build, optionally uptrain, and measure. Its `key` names it on disk, so a
finished cell is never recomputed (an interrupted report resumes where it stopped). A *budget*
sets how much each cell may cost; `small` fits in an hour on a 2-core CPU, `large` is for a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

STRATEGIES = ("cycle", "sequence", "middle_cycle")
INITS = ("stepwise", "average", "lower")
RANKS = (0, 16, 64, 256, "full")
EXIT_SCHEDULES = ("none", "weighted", "aggressive")
# Budget fields only the calibrated cells read: kept out of every other cell's fingerprint, so that
# changing them recomputes those cells alone (and caches from before these fields stay valid).
CALIBRATION_FIELDS = ("calib_tokens", "sequential_fraction", "local_fraction")


@dataclass(frozen=True)
class Budget:
    """How much compute each cell gets. Every field changes results, so all are in the fingerprint (the
    CALIBRATION_FIELDS in that of the cells that read them only)."""

    name: str
    train_tokens: int  # KD tokens per trained cell
    seq_len: int  # training sequence length
    batch_size: int
    lr: float
    warmup_steps: int
    eval_tokens: int  # held-out tokens for the strided perplexity
    eval_context: int  # window of the strided perplexity (stride = half of it)
    agreement_tokens: int  # held-out tokens for teacher agreement and the exit curve
    task_limit: int | None  # items per lm-eval task (None: all)
    curve_points: int  # held-out evaluations during training (perplexity against tokens)
    train_grid: bool  # uptrain every grid cell (large) or only the ablation subset (small)
    ranks: tuple = RANKS
    strategies: tuple = STRATEGIES
    inits: tuple = INITS
    num_loops: int = 2
    batch_eval: int = 4
    calib_tokens: int = 8192  # training-data tokens of the calibration statistics (calibrated cells)
    sequential_fraction: float = 0.5  # share of those sequences the sequential refit runs on
    local_fraction: float = 0.3  # share of a trained cell's tokens the local+KD cell spends on local distillation

    @property
    def train_steps(self) -> int:
        """Optimizer steps of a trained cell: the trainer's own count, max_tokens // (batch x seq_len)."""
        return self.train_tokens // (self.batch_size * self.seq_len)

    @property
    def local_steps(self) -> int:
        """Local-distillation steps (batch x seq_len tokens each) of the local+KD cell, leaving at least one
        KD step; 0 when the budget is too small to split (the cell is then not planned)."""
        if self.local_fraction <= 0:
            return 0
        return min(self.train_steps - 1, max(1, round(self.local_fraction * self.train_steps)))

    def fingerprint(self, extra: dict, fields: tuple[str, ...] = ()) -> str:
        """Hash of every field that changes a cell's result; of CALIBRATION_FIELDS only those in `fields`."""
        spec = {k: v for k, v in dataclasses.asdict(self).items() if k not in CALIBRATION_FIELDS or k in fields}
        blob = json.dumps({**spec, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


BUDGETS = {
    # ~45-55 minutes on 2 CPU cores for SmolLM2-135M (see docs/results); tiny KD budgets only show trends.
    "small": Budget(name="small", train_tokens=8192, seq_len=128, batch_size=4, lr=5e-4, warmup_steps=2,
                    eval_tokens=2048, eval_context=256, agreement_tokens=1024, task_limit=20, curve_points=4,
                    train_grid=False, calib_tokens=8192),
    # For a GPU: every grid cell uptrained on 4M tokens, full benchmark sets.
    "large": Budget(name="large", train_tokens=4_000_000, seq_len=512, batch_size=32, lr=3e-4, warmup_steps=50,
                    eval_tokens=65536, eval_context=1024, agreement_tokens=16384, task_limit=None, curve_points=10,
                    train_grid=True, batch_eval=16, calib_tokens=65536),
}


@dataclass(frozen=True)
class Cell:
    """One model of the report. `model` is teacher, recursive, truncated or layer_subset.

    `calibration`: none (plain conversion), calibrated (calibration statistics of the training data,
    `convert(calibration=)` then the sequential refit) or allocated (the same with per-linear ranks
    holding the parameters of uniform rank `rank`); `local`: local distillation before KD.
    """

    model: str
    strategy: str = "cycle"
    init: str = "stepwise"
    rank: int | str = 0
    lora_init: str = "svd"
    variant: str = "relaxed"
    trained: bool = False
    objective: str = "kd"  # kd (alpha=1) or lm (alpha=0: no teacher)
    exit_schedule: str = "none"
    benchmarks: bool = False  # also run the seven lm-eval tasks
    calibration: str = "none"
    local: bool = False
    tags: tuple[str, ...] = field(default=(), compare=False)  # which tables/findings use it

    @property
    def key(self) -> str:
        if self.model != "recursive":
            base = self.model
        else:
            base = f"{'residual' if self.variant == 'residual' else 'rec'}-{self.strategy}-{self.init}-r{self.rank}"
            if self.lora_init != "svd" and self.rank != 0:
                base += f"-{self.lora_init}"
            if self.calibration != "none":
                base += "-cal" if self.calibration == "calibrated" else "-alloc"
        if self.trained:
            base += "-local" if self.local else ""
            base += f"-{self.objective}"
            if self.exit_schedule != "none":
                base += f"-exit_{self.exit_schedule}"
        return base

    @property
    def label(self) -> str:
        if self.model == "teacher":
            return "teacher"
        if self.model == "truncated":
            return "truncated (first K layers)"
        if self.model == "layer_subset":
            return "K stepwise layers, no loop"
        name = "residual" if self.variant == "residual" else ("recursive" if self.rank == 0 else "relaxed")
        parts = [name, self.strategy, self.init, f"r={self.rank}"]
        if self.lora_init != "svd" and self.rank != 0:
            parts.append(f"{self.lora_init} LoRA init")
        if self.calibration == "calibrated":
            parts.append("calibrated")
        elif self.calibration == "allocated":
            parts[3] = f"ranks allocated to the parameters of r={self.rank}, calibrated"
        if self.local:
            parts.append("local distillation + KD")
        if self.trained and self.objective != "kd":
            parts.append("LM loss only")
        if self.exit_schedule != "none":
            parts.append(f"{self.exit_schedule} exit loss")
        return " ".join(parts)

    @property
    def budget_fields(self) -> tuple[str, ...]:
        """The CALIBRATION_FIELDS of the budget this cell's result depends on."""
        if self.calibration == "none":
            return ()
        return CALIBRATION_FIELDS if self.local else CALIBRATION_FIELDS[:2]

    def recursion(self, num_loops: int) -> dict:
        return dict(num_loops=num_loops, strategy=self.strategy, init=self.init, lora_rank=self.rank,
                    lora_init=self.lora_init, variant=self.variant)


def middle_rank(ranks) -> int:
    """The rank of the single-rank ablations (init, LoRA init, exits): 64 when the budget has it,
    else its first rank between 0 and full."""
    return 64 if 64 in ranks else next(r for r in ranks if r not in (0, "full"))


def calibration_cells(ranks, local: bool = True) -> dict[str, Cell]:
    """The calibrated-conversion comparisons at the middle rank (cycle, average init, as the
    recommended relaxed model): plain vs calibrated conversion, local+KD vs KD from the calibrated
    conversion, uniform vs allocated ranks; each untrained and after KD. Name -> cell."""
    rec = lambda **kw: Cell(model="recursive", strategy="cycle", init="average", rank=middle_rank(ranks),  # noqa: E731
                            tags=("calibration",), **kw)
    cells = {"plain": rec(), "plain_kd": rec(trained=True),
             "calibrated": rec(calibration="calibrated"), "calibrated_kd": rec(calibration="calibrated", trained=True),
             "local_kd": rec(calibration="calibrated", local=True, trained=True),
             "allocated": rec(calibration="allocated"), "allocated_kd": rec(calibration="allocated", trained=True)}
    if not local:
        del cells["local_kd"]
    return cells


def _merge(cells: list[Cell]) -> list[Cell]:
    """One cell per key; tags and the benchmarks flag of duplicates are combined."""
    merged: dict[str, Cell] = {}
    for c in cells:
        if c.key in merged:
            old = merged[c.key]
            c = dataclasses.replace(old, benchmarks=old.benchmarks or c.benchmarks,
                                    tags=tuple(dict.fromkeys(old.tags + c.tags)))
        merged[c.key] = c
    return list(merged.values())


def plan_cells(budget: Budget, benchmarks: bool = True) -> list[Cell]:
    """Every cell of a report, in the order they run (cheap, untrained ones first)."""
    rec = lambda **kw: Cell(model="recursive", **kw)  # noqa: E731
    cells: list[Cell] = [Cell(model="teacher", benchmarks=benchmarks, tags=("main",))]

    # 1. strategy x init x rank without training (all SVD ranks of one conversion come from one SVD)
    for s in budget.strategies:
        for i in budget.inits:
            for r in budget.ranks:
                cells.append(rec(strategy=s, init=i, rank=r, tags=("grid",)))
    calibrated = calibration_cells(budget.ranks, local=budget.local_steps > 0)
    cells += [c for c in calibrated.values() if not c.trained]

    # 2. the same grid uptrained (large) or the subset each finding needs (small)
    kd = dict(trained=True)
    if budget.train_grid:
        for s in budget.strategies:
            for i in budget.inits:
                for r in budget.ranks:
                    if r != "full":
                        cells.append(rec(strategy=s, init=i, rank=r, tags=("grid_trained",), **kd))
    mid = middle_rank(budget.ranks)
    cells += [rec(strategy=s, init="stepwise", rank=0, tags=("strategy",), **kd) for s in budget.strategies]
    cells += [rec(strategy="cycle", init=i, rank=0, tags=("init_recursive",), **kd) for i in budget.inits]
    cells += [rec(strategy="cycle", init=i, rank=mid, tags=("init_relaxed",), **kd) for i in budget.inits]
    cells += [
        rec(strategy="cycle", init="average", rank=mid, tags=("lora_init",), **kd),
        rec(strategy="cycle", init="average", rank=mid, lora_init="zero", tags=("lora_init",), **kd),
        rec(strategy="cycle", init="stepwise", rank=0, tags=("kd",), **kd),
        rec(strategy="cycle", init="stepwise", rank=0, objective="lm", tags=("kd",), **kd),
    ]
    # 3. baselines at the same parameter count and the same budget, and the models we recommend
    cells += [
        Cell(model="truncated", benchmarks=benchmarks, tags=("main",), **kd),
        Cell(model="layer_subset", benchmarks=benchmarks, tags=("main",), **kd),
        rec(strategy="cycle", init="stepwise", rank=0, benchmarks=benchmarks, tags=("main",), **kd),
    ]
    cells += [rec(strategy="cycle", init="average", rank=r, benchmarks=benchmarks, tags=("main", "rank"), **kd)
              for r in budget.ranks if r not in (0, "full")]
    cells.append(rec(strategy="sequence", init="average", rank=mid, variant="residual", benchmarks=benchmarks,
                     tags=("main",), **kd))
    # 4. early-exit recipes on the recommended relaxed model
    cells += [rec(strategy="cycle", init="average", rank=mid, exit_schedule=e, tags=("exits",), **kd)
              for e in EXIT_SCHEDULES]
    # 5. calibrated conversion, local distillation and allocated ranks, after the same KD budget
    cells += [c for c in calibrated.values() if c.trained]
    return _merge(cells)
