"""Run the cells of a report, one at a time, caching each finished cell as JSON.

Every cell is measured the same way (`measure`): strided held-out perplexity, per-exit perplexity,
agreement with the teacher, the confidence-exit curve, and optionally the seven lm-eval tasks.
Trained cells go through the ordinary trainer (`recursify.train.trainer.train`) with the budget's
KD token count, so a report number means exactly what `recursify train` would give. Calibrated
cells convert with the library's own recipe (`conversion.calibrate.cached_stats` on the training
data, once per report and cached in .cache/calibration, then `conversion.recipe.calibrated_convert`:
allocated ranks, `convert(calibration=)`, the sequential refit); the local+KD cell runs
`train.local.local_distill` on part of its tokens first.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .plan import BUDGETS, Budget, Cell, plan_cells


class ReportError(ValueError):
    """A report that cannot run as asked; the message is one line meant for the user."""


@dataclass
class ReportConfig:
    model: str = "smollm2-135m"
    budget: str | Budget = "small"
    out: str = "reports/smollm2"
    data: list[str] = field(default_factory=lambda: ["corpus/python-docs/train"])
    heldout: list[str] = field(default_factory=lambda: ["corpus/python-docs/heldout"])
    benchmarks: bool = True  # run the seven lm-eval tasks on the main models
    train_tokens: int | None = None  # override the budget's KD tokens per trained cell
    calib_tokens: int | None = None  # override the budget's calibration tokens
    task_limit: int | None = None  # override the budget's items per lm-eval task
    rerun: bool = False  # ignore cached cells
    progress: bool = True

    def resolve_budget(self) -> Budget:
        if isinstance(self.budget, Budget):
            budget = self.budget
        elif self.budget in BUDGETS:
            budget = BUDGETS[self.budget]
        else:
            raise ReportError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.train_tokens is not None:
            budget = dataclasses.replace(budget, train_tokens=self.train_tokens)
        if self.calib_tokens is not None:
            budget = dataclasses.replace(budget, calib_tokens=self.calib_tokens)
        if budget.calib_tokens < budget.seq_len:
            raise ReportError(f"calib_tokens={budget.calib_tokens} is less than one sequence of {budget.seq_len} tokens")
        if not 0 < budget.sequential_fraction <= 1 or not 0 <= budget.local_fraction < 1:
            raise ReportError(f"sequential_fraction must be in (0, 1] and local_fraction in [0, 1), got "
                              f"{budget.sequential_fraction} and {budget.local_fraction}")
        if self.task_limit is not None:
            if self.task_limit < 1:
                raise ReportError(f"limit must be at least 1 item per task, got {self.task_limit}")
            budget = dataclasses.replace(budget, task_limit=self.task_limit)
        if budget.train_tokens < budget.seq_len * budget.batch_size:
            raise ReportError(f"train_tokens={budget.train_tokens} is less than one batch "
                              f"({budget.batch_size} x {budget.seq_len} tokens)")
        return budget


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class ReportRunner:
    """Holds what every cell shares: the teacher, the held-out tokens, the budget, the cache."""

    def __init__(self, cfg: ReportConfig, console=None):
        self.cfg, self.console = cfg, console
        self.budget = cfg.resolve_budget()
        self.out = Path(cfg.out)
        self.cells_dir = self.out / "cells"
        self.cache = self.out / ".cache"
        for src in list(cfg.data) + list(cfg.heldout):
            if not Path(src).exists():
                raise ReportError(f"data not found: {src} (fetch the default corpora with scripts/fetch_corpora.sh)")
        self._converted: tuple[tuple, object] | None = None
        self._calibration: tuple[torch.Tensor, object] | None = None  # (sequences, statistics), once per run
        self._calibrated: dict[tuple, object] = {}  # calibrated conversions, shared by the cells that start from them

    def fingerprint_of(self, cell: Cell) -> str:
        """What a cached result of `cell` must have been computed with (budget, model, data)."""
        extra = {"model": self.cfg.model, "data": self.cfg.data, "heldout": self.cfg.heldout}
        return self.budget.fingerprint(extra, cell.budget_fields)

    # ------------------------------------------------------------------ setup
    def log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def setup(self) -> None:
        import recursify as rf

        from ..config import ConfigError, Layout, RecursionConfig
        from ..families import UnsupportedModelError, detect_family
        from ..hub import atomic_dir, check_causal
        from ..data import DataConfig, DataError, PackedDataset, build_datasets, overlap_report

        try:
            self.teacher, self.tok = rf.load_pretrained(self.cfg.model)
            check_causal(self.teacher, self.cfg.model)
            detect_family(self.teacher.config)
        except (rf.ModelLoadError, UnsupportedModelError) as e:
            raise ReportError(str(e)) from e
        L = self.teacher.config.num_hidden_layers
        strategies = []
        for s in self.budget.strategies:
            try:
                Layout.build(L, RecursionConfig(num_loops=self.budget.num_loops, strategy=s))
                strategies.append(s)
            except ConfigError as e:
                self.log(f"[yellow]warning:[/] skipping strategy {s}: {e}")
        if "cycle" not in strategies:
            raise ReportError(f"num_loops={self.budget.num_loops} does not divide the {L} layers of {self.cfg.model}")
        self.budget = dataclasses.replace(self.budget, strategies=tuple(strategies))
        self.num_layers, self.block = L, L // self.budget.num_loops
        # Models are built on the CPU (the teacher stays there as their source) and measured on the
        # GPU when there is one; the trainer picks its own device.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.reference = self.teacher if self.device.type == "cpu" else copy.deepcopy(self.teacher).to(self.device)

        # The trainer loads its teacher by path: keep one float copy, written once.
        self.teacher_dir = self.cache / "teacher"
        if not (self.teacher_dir / "config.json").exists():
            with atomic_dir(self.teacher_dir) as tmp:
                self.teacher.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)

        b = self.budget
        try:
            heldout, _ = build_datasets(DataConfig(sources=self.cfg.heldout, seq_len=b.eval_context, heldout_fraction=0.0,
                                                   max_tokens=b.eval_tokens, cache_dir=str(self.cache / "tokens")), self.tok)
            train_seqs, _ = build_datasets(DataConfig(sources=self.cfg.data, seq_len=b.seq_len, heldout_fraction=0.0,
                                                      max_tokens=b.train_tokens, cache_dir=str(self.cache / "tokens")), self.tok)
        except DataError as e:
            raise ReportError(str(e)) from e
        n = min(heldout.num_tokens, b.eval_tokens)
        if n < 2 * b.eval_context:
            raise ReportError(f"held-out data has {n} tokens; the budget needs at least {2 * b.eval_context}")
        self.stream = torch.as_tensor(heldout.read_tokens(0, n).astype("int64"))
        m = min(n, b.agreement_tokens) // b.eval_context * b.eval_context
        self.agreement_seqs = self.stream[:m].view(-1, b.eval_context)
        # the held-out stream cut into training-length sequences, as the trainer would see it
        self.overlap = overlap_report(train_seqs, PackedDataset.from_tokens(self.stream.numpy(), b.seq_len))
        if self.overlap:
            self.log(f"[yellow]warning:[/] {self.overlap} held-out sequences also occur in the training data; "
                     "perplexities are optimistic")

    # ------------------------------------------------------------------ models
    def build(self, cell: Cell):
        import recursify as rf

        from ..conversion.baselines import layer_subset, truncated
        from ..conversion.convert import source_layer_for_slot, with_rank

        if cell.model == "teacher":
            return self.reference
        if cell.calibration != "none":
            return self.build_calibrated(cell)
        if cell.model == "truncated":
            return truncated(self.teacher, self.block)
        recursion = rf.RecursionConfig(**cell.recursion(self.budget.num_loops))
        if cell.model == "layer_subset":  # the layers a stepwise cycle conversion shares, run once
            return layer_subset(self.teacher, source_layer_for_slot(rf.Layout.build(self.num_layers, recursion), "stepwise"))
        if cell.trained or cell.lora_init != "svd" or cell.rank == 0 or cell.variant != "relaxed":
            return rf.convert(self.teacher, recursion, progress=False)
        # untrained SVD ranks of one (strategy, init): one full conversion, truncated per rank
        group = (cell.strategy, cell.init)
        if self._converted is None or self._converted[0] != group:
            self._converted = None
            top = "full" if "full" in self.budget.ranks else max(r for r in self.budget.ranks if r != "full")
            self._converted = (group, rf.convert(self.teacher, dataclasses.replace(recursion, lora_rank=top), progress=False))
        return with_rank(self._converted[1], cell.rank)

    def calibration(self) -> tuple[torch.Tensor, object]:
        """(sequences, statistics) of the budget's calibration tokens of the training data: computed once
        per report run, the statistics cached on disk for the next one (`conversion.calibrate.cached_stats`)."""
        from ..conversion.calibrate import CalibrationError, cached_stats, calibration_sequences

        if self._calibration is None:
            b = self.budget
            try:
                seqs = calibration_sequences(self.cfg.data, self.tok, b.calib_tokens, b.seq_len,
                                             cache_dir=str(self.cache / "tokens"))
                stats = cached_stats(self.reference, seqs, self.cache / "calibration", progress=False)
            except CalibrationError as e:
                raise ReportError(str(e)) from e
            self._calibration = (seqs, stats)
        return self._calibration

    def build_calibrated(self, cell: Cell):
        """Calibrated conversion + sequential refit (benchmarks/recover.py's recipe, `calibrated_convert`),
        with allocated ranks holding the uniform rank's parameter fraction of the teacher for `allocated`."""
        import recursify as rf

        from ..config import ConfigError
        from ..conversion.recipe import calibrated_convert

        group = (cell.strategy, cell.init, cell.rank, cell.calibration)
        if group not in self._calibrated:
            seqs, stats = self.calibration()
            recursion = rf.RecursionConfig(**cell.recursion(self.budget.num_loops))
            n = max(1, int(len(seqs) * self.budget.sequential_fraction))
            try:
                model = calibrated_convert(self.teacher, recursion, stats, seqs[:n], sequential=True,
                                           allocate_to="same" if cell.calibration == "allocated" else None,
                                           device=self.device)
            except ConfigError as e:
                raise ReportError(str(e)) from e
            self._calibrated[group] = model
        return copy.deepcopy(self._calibrated[group])

    def local(self, model, steps: int) -> dict:
        """Local distillation of `model` in place for `steps` batches of the training data (train.local)."""
        from ..conversion.calibrate import calibration_sequences
        from ..train.local import local_distill

        b = self.budget
        tokens = steps * b.batch_size * b.seq_len
        seqs = calibration_sequences(self.cfg.data, self.tok, tokens, b.seq_len, cache_dir=str(self.cache / "tokens"))
        done = local_distill(model.to(self.device), self.teacher, seqs, lr=b.lr, batch_size=b.batch_size,
                             max_steps=steps, warmup=b.warmup_steps, progress=False)
        return {"local_tokens": done["tokens"], "local_seconds": done["seconds"], "local_steps": done["steps"],
                "local_loss": [done["first_loss"], done["last_loss"]]}

    def measure(self, model, cell: Cell) -> dict:
        from ..eval.evaluate import ExitView
        from ..eval.harness import run_paper_tasks
        from ..eval.metrics import confidence_exit_curve, count_parameters, perplexity, teacher_agreement
        from ..modeling import RecursiveForCausalLM

        b = self.budget
        model = model.to(self.device)
        ppl = lambda m: perplexity(m, self.stream, context_len=b.eval_context, stride=b.eval_context // 2,  # noqa: E731
                                   batch_size=b.batch_eval)["ppl"]
        r = {"params": count_parameters(model), "params_non_embedding": count_parameters(model, exclude_embeddings=True)}
        r["ppl"] = ppl(model)
        recursive = isinstance(model, RecursiveForCausalLM) and model.layout.loopable and model.layout.num_loops > 1
        if recursive and (cell.trained or "exits" in cell.tags):
            # the last exit is the full model, already scored
            r["exit_ppl"] = [ppl(ExitView(model, k)) for k in range(1, model.layout.num_loops)] + [r["ppl"]]
        if cell.model != "teacher" and cell.trained:
            a = teacher_agreement(model, self.reference, self.agreement_seqs, batch_size=b.batch_eval)
            r["kl"], r["agreement"] = a["kl"], a["top1_agreement"]
        if recursive and "exits" in cell.tags:
            r["exit_curve"] = confidence_exit_curve(model, self.reference, self.agreement_seqs, batch_size=b.batch_eval)
        if cell.benchmarks:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paper = run_paper_tasks(model, tokenizer=self.tok, limit=b.task_limit, batch_size=b.batch_eval,
                                        device=str(self.device))
            paper.pop("raw", None)
            r["paper"] = paper
        return r

    def train(self, cell: Cell, model, tokens: int | None = None) -> tuple[object, dict, Path]:
        """Uptrain a saved copy of `model` with the ordinary trainer on `tokens` (default: the budget's)
        KD tokens: (trained model, training facts, work folder)."""
        import recursify as rf

        from ..train import TrainConfig, train

        b = self.budget
        work = self.cache / "work" / cell.key
        shutil.rmtree(work, ignore_errors=True)
        model.save_pretrained(work / "student")
        self.tok.save_pretrained(work / "student")
        tokens = b.train_tokens if tokens is None else tokens
        steps = tokens // (b.batch_size * b.seq_len)
        kd = cell.objective == "kd"
        t0 = time.time()
        result = train(TrainConfig(
            student=str(work / "student"), teacher=str(self.teacher_dir) if kd else "none", alpha=1.0 if kd else 0.0,
            data=list(self.cfg.data), heldout=list(self.cfg.heldout), cache_dir=str(self.cache / "tokens"),
            out=str(work / "run"), max_tokens=tokens, seq_len=b.seq_len, batch_size=b.batch_size, lr=b.lr,
            warmup_steps=b.warmup_steps, exit_schedule=cell.exit_schedule, eval_every=max(1, steps // b.curve_points),
            eval_tokens=b.agreement_tokens, save_every=-1, keep_last=1, progress=False, seed=0))
        if result.get("interrupted"):
            raise KeyboardInterrupt
        records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curve = [{"tokens": r["tokens"], "ppl": r["ppl"], "exit_ppl": r.get("exit_ppl")} for r in records
                 if r.get("kind") == "eval"]
        trained, _ = rf.load_pretrained(str(work / "run"))
        facts = {"train_tokens": result["tokens"], "train_seconds": time.time() - t0,
                 "train_tokens_per_s": result.get("tokens_per_s"), "curve": curve}
        return trained, facts, work

    # ------------------------------------------------------------------ cells
    def cached(self, cell: Cell) -> dict | None:
        path = self.cells_dir / f"{cell.key}.json"
        if self.cfg.rerun or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if data.get("fingerprint") != self.fingerprint_of(cell):
            return None
        if cell.benchmarks and "paper" not in data["result"]:
            return None
        return data

    def run_cell(self, cell: Cell) -> dict:
        t0 = time.time()
        model = self.build(cell)
        result: dict = {}
        work = None
        if cell.trained:
            if "main" in cell.tags:
                result["ppl_before"] = self.measure(model, dataclasses.replace(cell, trained=False, benchmarks=False, tags=()))["ppl"]
            local = {"local_tokens": 0, "local_seconds": 0.0}
            if cell.local:  # local distillation first, on the budget's tokens: KD gets the rest
                local = self.local(model, self.budget.local_steps)
            model, facts, work = self.train(cell, model, self.budget.train_tokens - local["local_tokens"])
            if cell.local:
                facts.update(local, kd_tokens=facts["train_tokens"], train_tokens=facts["train_tokens"] + local["local_tokens"],
                             train_seconds=facts["train_seconds"] + local["local_seconds"],
                             curve=[{**p, "tokens": p["tokens"] + local["local_tokens"]} for p in facts["curve"]])
            result.update(facts)
        result.update(self.measure(model, cell))
        if cell.calibration == "allocated":
            result["rank_pattern"] = model.recursion.rank_pattern
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        data = {"key": cell.key, "label": cell.label, "cell": {k: v for k, v in dataclasses.asdict(cell).items() if k != "tags"},
                "tags": list(cell.tags), "fingerprint": self.fingerprint_of(cell), "result": result, "seconds": time.time() - t0}
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.cells_dir / f"{cell.key}.json", data)
        return data

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cells = plan_cells(self.budget, benchmarks=self.cfg.benchmarks)
        done, todo = {}, []
        for c in cells:
            hit = self.cached(c)
            if hit is not None:
                done[c.key] = {**hit, "tags": list(c.tags)}
            else:
                todo.append(c)
        if done:
            self.log(f"{len(done)} of {len(cells)} cells already done in {self.cells_dir}; running the other {len(todo)}")
        bar = tqdm(todo, desc="report", disable=not self.cfg.progress, unit="cell")
        computed = []
        for c in bar:
            bar.set_postfix_str(c.key)
            done[c.key] = self.run_cell(c)
            computed.append(c.key)
            r = done[c.key]["result"]
            bar.write(f"{c.label:<55} ppl {r['ppl']:>12.4g}   {done[c.key]['seconds']:6.1f} s")
        self._converted, self._calibration, self._calibrated = None, None, {}
        return {"cells": [done[c.key] for c in cells], "computed": computed, "budget": dataclasses.asdict(self.budget),
                "model": self.cfg.model, "data": self.cfg.data, "heldout": self.cfg.heldout,
                "overlap_sequences": self.overlap, "heldout_tokens": int(self.stream.numel())}


def run_report(cfg: ReportConfig, console=None) -> dict:
    """Run (or resume) a report and write report.md, results.json and the plots into cfg.out."""
    from .render import write_report

    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per report, not one per checkpoint load
    runner = ReportRunner(cfg, console)
    t0 = time.time()
    runner.setup()
    summary = runner.run()
    summary["seconds"] = time.time() - t0
    write_report(summary, Path(cfg.out), command=_command(cfg))
    return summary


def _command(cfg: ReportConfig) -> str:
    budget = cfg.budget.name if isinstance(cfg.budget, Budget) else cfg.budget
    parts = ["recursify report", f"--model {cfg.model}", f"--budget {budget}", f"--out {cfg.out}"]
    if cfg.data != ReportConfig().data:
        parts.append(f"--data {','.join(cfg.data)}")
    if cfg.heldout != ReportConfig().heldout:
        parts.append(f"--heldout {','.join(cfg.heldout)}")
    if cfg.train_tokens is not None:
        parts.append(f"--train-tokens {cfg.train_tokens}")
    if cfg.calib_tokens is not None:
        parts.append(f"--calib-tokens {cfg.calib_tokens}")
    if cfg.task_limit is not None:
        parts.append(f"--limit {cfg.task_limit}")
    if not cfg.benchmarks:
        parts.append("--no-benchmarks")
    return " ".join(parts)
