"""`recursify compress`'s executor: from a pretrained model to a usable smaller one.

calibrate -> convert (activation-aware LoRA init) -> distil within the time budget -> evaluate ->
an ordinary recursify checkpoint with `summary.md` / `summary.json` beside the weights. Every stage
is the library's own code (the trainer is the trainer) and every decision about time is `plan.py`'s;
this module only measures, sequences the stages, keeps the clock, and resumes: its work folder
`.<out>.work/` (with the `RunState` record) survives a kill and is removed on success.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..cpu_heap import release_freed_memory, return_freed_memory
from .config import FIT_TOKENS, SEARCH_TOKENS, CompressConfig, CompressError, fmt_seconds
from .plan import (Available, BudgetError, Costs, Distillation, calibration_sizes, conversion_scale, distillation,
                   local_seconds, plan_distillation, plan_preparation)
from .state import STATE_FILE, RunState, identity
from .summary import build_summary, measure, render_summary


class Clock:
    """Budget bookkeeping that survives a resume: seconds spent by earlier attempts are kept in
    the work folder's state file."""

    def __init__(self, budget: float, spent_before: float = 0.0):
        self.budget, self.before, self.t0 = budget, spent_before, time.monotonic()

    @property
    def spent(self) -> float:
        return self.before + time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.budget - self.spent


class _Run:
    """What every stage shares: the request, the work folder, the clock and the resume record."""

    def __init__(self, cfg: CompressConfig, work: Path, state: RunState, log: Callable[[str], None]):
        self.cfg, self.work, self.state, self.log = cfg, work, state, log
        self.clock = Clock(cfg.time_budget, state.spent)

    def save(self, **values) -> None:
        self.state.update(**values, config=identity(self.cfg), spent=self.clock.spent)
        self.state.save(self.work / STATE_FILE)

    def stage(self, i: int, text: str) -> None:
        self.log(f"[{i}/5] {text}  ({fmt_seconds(self.clock.spent)} of {fmt_seconds(self.clock.budget)} spent)")


def compress(cfg: CompressConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the recipe; returns the summary written to `out/summary.json`.

    A bad request fails with CompressError and leaves nothing behind (a resumable work folder
    from an earlier attempt is kept); an interruption keeps the work folder for the next call.
    """
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.work"
    fresh = not (work / STATE_FILE).exists() or cfg.overwrite
    try:  # every stage's resident peak is then what is alive, as the memory plan counts it
        with return_freed_memory():
            return _compress(cfg, out, work, log)
    except CompressError:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _check_request(cfg: CompressConfig, out: Path):
    """Everything that can be checked before anything is loaded or written: (placement, layout,
    source config, conversion scale)."""
    import recursify as rf

    from ..data.sources import resolve_sources
    from ..util.device import DeviceError, resolve_placement

    cfg.validate()
    try:
        where = resolve_placement(cfg.device, cfg.dtype)
    except DeviceError as e:
        raise CompressError(str(e)) from None
    if cfg.paper_tasks and __import__("importlib.util").util.find_spec("lm_eval") is None:
        raise CompressError("--paper-tasks needs lm-evaluation-harness: pip install 'recursify[eval]'")
    try:  # the layout and the model's family
        auto, auto_loops = cfg.lora_rank == "auto", cfg.loops == "auto"
        recursion = rf.RecursionConfig(num_loops=2 if auto_loops else cfg.loops, strategy=cfg.strategy, init=cfg.init,
                                       lora_rank=0 if auto or auto_loops else (64 if cfg.lora_rank is None else cfg.lora_rank))
        if cfg.target_params is not None and not 0 < cfg.target_params <= 1:
            raise CompressError(f"--target-params is a fraction of the teacher's parameters in (0, 1], got {cfg.target_params}")
        resolve_sources(cfg.data)  # a missing or unreadable source fails before the model loads
        if cfg.heldout:
            resolve_sources(cfg.heldout)
        source_config = rf.hub.load_config(cfg.model)
        family = rf.families.detect_family(source_config)
        arch = rf.families.arch_from_config(family, source_config)
        if not auto_loops:
            rf.Layout.build(arch.num_layers, recursion)
        scale = conversion_scale(arch, family)  # a conversion's cost in forwards, relative to SmolLM2's
    except ValueError as e:
        raise CompressError(str(e)) from e
    if out.exists() and not cfg.overwrite:
        raise CompressError(f"{out} already exists; pass --overwrite to replace it")
    return where, recursion, source_config, scale


def _check_memory(cfg: CompressConfig, source_config, recursion, where, log):
    """Print each stage's estimated peak memory; refuse, before any work, a run that cannot fit."""
    from ..budget import fit_memory
    from ..util.memory import fmt_gib

    target = cfg.target_params if cfg.loops == "auto" or cfg.lora_rank == "auto" else None
    memory, free, changes, hint = fit_memory(source_config, recursion, batch=cfg.batch_size, seq_len=cfg.seq_len,
                                             calib_tokens=cfg.calib_tokens, curvature=cfg.curvature, placement=where,
                                             target_params=target, checkpointing=cfg.gradient_checkpointing,
                                             trainable=cfg.trainable)
    log("memory plan (estimated peaks): " + ", ".join(f"{k} {fmt_gib(v)}" for k, v in memory.stages.items())
        + f"; {fmt_gib(free)} usable on {where.device} (85 % of what is free)" + (f" ({', '.join(changes)} to fit)" if changes else ""))
    if hint is not None:
        raise CompressError(f"this run needs about {fmt_gib(memory.peak)} ({memory.peak_stage}) but {fmt_gib(free)} "
                            f"is usable on {where.device}; try {hint}")
    return memory


def _layouts(cfg: CompressConfig, teacher, recursion) -> list:
    """--loops auto: the layouts that fit the budget, known before calibration. --lora-rank auto: a
    budget that even rank 0 exceeds fails now, not after calibration."""
    if cfg.loops == "auto":
        from ..conversion.layout_search import candidates

        try:
            return candidates(teacher, cfg.target_params, cfg.strategy, cfg.search_init, max_compute=cfg.max_compute)
        except ValueError as e:
            raise CompressError(str(e)) from e
    if cfg.lora_rank == "auto":
        from ..conversion.allocate import parameter_count

        floor = parameter_count(teacher, recursion) / sum(p.numel() for p in teacher.parameters())
        if floor > cfg.target_params:
            raise CompressError(f"--target-params {cfg.target_params:g} is below what even rank 0 needs "
                                f"({floor:.1%} of the teacher's parameters): use more loops or a larger target")
    return []


def _convert(run: _Run, teacher, tok, recursion, options: list, costs: Costs, curvature_fits: bool, device):
    """Stages 2-3: plan the preparation, calibrate, search the layouts (if kept), convert."""
    from ..conversion.calibrate import cached_stats, calibration_sequences, stats_paths
    from ..conversion.recipe import calibrated_convert
    from ..hub import cache_root

    cfg = run.cfg
    auto, auto_loops = cfg.lora_rank == "auto", cfg.loops == "auto"
    # The planner's view of the data: the training text (in order, so any count is a prefix), which
    # token counts already have statistics, the layouts and the one taken without the search.
    pool = calibration_sequences(cfg.data, tok, cfg.calib_tokens + (SEARCH_TOKENS if auto_loops else 0), cfg.seq_len)
    root = cache_root() / "calibration"
    sizes = calibration_sizes(cfg, len(pool) * cfg.seq_len)
    paths = stats_paths(teacher, [pool[: n // cfg.seq_len] for n in sizes], root)
    pick = None
    if auto_loops:
        from ..conversion.layout_search import without_search

        pick = without_search(teacher, options)
    available = Available(calib_tokens=len(pool) * cfg.seq_len, layouts=len(options),
                          cached=frozenset(n for n, path in zip(sizes, paths) if path.exists()),
                          fallback=(pick.loops, pick.rank) if pick else None)
    try:
        prep = plan_preparation(cfg, costs, run.clock.left, available,
                                curvature=curvature_fits and run.state.curvature, sequential=run.state.sequential)
    except BudgetError as e:
        for line in e.lines:
            run.log(line)
        raise
    for line in prep.lines:
        run.log(line)
    if auto_loops and not prep.search:
        recursion = pick.recursion
    run.save(sequential=prep.sequential, curvature=prep.curvature)
    seqs = pool[: prep.calib_rows]
    run.stage(2, f"calibrating on {seqs.numel()} tokens")
    t0 = time.monotonic()
    stats = cached_stats(teacher, seqs, root)
    fit_seqs = seqs[: max(1, FIT_TOKENS // cfg.seq_len)]  # the sequential refit's and the curvature's tokens
    if prep.search:
        from ..conversion.layout_search import candidates, search

        run.stage(3, f"choosing the loops for {cfg.target_params:.0%} of the teacher's parameters: converting "
                     f"{len(options)} layouts and scoring them on {SEARCH_TOKENS} training tokens")
        if auto:
            options = candidates(teacher, cfg.target_params, cfg.strategy, cfg.search_init, stats, allocate=True,
                                 damp=cfg.damp, max_compute=cfg.max_compute)
        best = search(teacher, stats, pool[slice(*prep.probe)], options, cfg.seq_len, damp=cfg.damp, log=run.log)
        recursion = best.recursion
        run.save(layout_search=[{"loops": c.loops, "rank": c.rank, "params": c.params, "ppl": c.ppl} for c in options])
        run.log(f"      chose {best.loops} loops, rank {best.rank}")
    recursion = dataclasses.replace(recursion, init=prep.init)
    # Per-linear ranks; with the curvature, by the distillation loss each component removes (the
    # search already allocated its layouts' ranks without it); "same": the chosen layout's size.
    allocate = (auto and not prep.search) or (prep.curvature and (auto or (auto_loops and cfg.allocate)))
    try:
        student = calibrated_convert(
            teacher, recursion, stats, fit_seqs, sequential=prep.sequential, curvature=prep.curvature,
            allocate_to=(cfg.target_params if auto else "same") if allocate else None, damp=cfg.damp,
            device=device, progress=True, log=lambda line: run.log("      " + line),
            announce=lambda r: run.stage(3, f"converting: {r.num_loops} loops, {cfg.strategy}, init {prep.init}, rank "
                                            f"{r.rank_text}, calibrated" + (" on both sides" if prep.curvature else "")
                                            + (", then sequential refit" if prep.sequential else "")))
    except ValueError as e:
        raise CompressError(str(e)) from e
    return student, t0


def _compress(cfg: CompressConfig, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    from ..data import DataConfig, DataError, build_datasets
    from ..eval.metrics import perplexity
    from ..hub import atomic_dir, load_pretrained
    from ..train.trainer import TrainConfig, TrainError, train

    where, recursion, source_config, scale = _check_request(cfg, out)
    memory = _check_memory(cfg, source_config, recursion, where, log)
    checkpointing, curvature_fits = memory.checkpointing, memory.curvature
    trainable = "body" if memory.frozen_embeddings else cfg.trainable
    if cfg.overwrite and work.exists():
        shutil.rmtree(work)
    state = RunState.load(work / STATE_FILE)
    if state is not None and not state.matches(cfg):
        raise CompressError(f"{work} holds an interrupted run with other settings; pass --overwrite to start afresh")
    resumed = state is not None
    run = _Run(cfg, work, state or RunState(), log)
    state = run.state
    work.mkdir(parents=True, exist_ok=True)
    run.save()
    if resumed:
        log(f"resuming the interrupted run in {work}")

    # 1. teacher, data -----------------------------------------------------------------------------
    run.stage(1, f"loading {cfg.model} and the data")
    device = where.device
    teacher, tok = load_pretrained(cfg.model, device=device)  # float32: calibration and conversion maths
    options = _layouts(cfg, teacher, recursion)
    try:
        _, heldout = build_datasets(DataConfig(sources=cfg.data, seq_len=cfg.seq_len, heldout_sources=cfg.heldout,
                                               max_tokens=cfg.calib_tokens, heldout_tokens=cfg.eval_tokens), tok)
    except DataError as e:
        raise CompressError(str(e)) from e
    n_eval = min(heldout.num_tokens, cfg.eval_tokens) // cfg.seq_len * cfg.seq_len
    if n_eval < 2 * cfg.seq_len:
        raise CompressError(f"the held-out text has {heldout.num_tokens} tokens; evaluation needs {2 * cfg.seq_len}")
    stream = torch.as_tensor(heldout.read_tokens(0, n_eval).astype("int64"))

    # 2-3. calibrate, convert ----------------------------------------------------------------------
    converted = work / "converted"
    if state.teacher_ppl is None:  # also measures this machine's forward speed, for the plan
        t0 = time.monotonic()
        teacher_ppl = perplexity(teacher, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
        run.save(teacher_ppl=teacher_ppl, fwd_tok_s=len(stream) / max(time.monotonic() - t0, 1e-6))
    costs = Costs(fwd_tok_s=state.fwd_tok_s, eval_tokens=n_eval, scale=scale)
    if not (converted / "config.json").exists():
        student, t0 = _convert(run, teacher, tok, recursion, options, costs, curvature_fits, device)
        with atomic_dir(converted) as tmp:
            student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        run.save(calib_seconds=time.monotonic() - t0)
    else:
        student, _ = load_pretrained(str(converted), device=device)
    if state.before is None:
        before = perplexity(student, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
        run.save(before=before, student_params=student.parameter_breakdown()["total"])
        log(f"      held-out perplexity: teacher {state.teacher_ppl:.2f}, converted (no training) {before:.4g}")

    def distil(student: Path, run_dir: Path, plan: Distillation, lr: float, exit_schedule: str = "none",
               hidden_weight: float = 0.0) -> dict:
        """The ordinary trainer, KD from the teacher as `plan` says; resumes a killed run."""
        try:
            result = train(TrainConfig(
                student=str(student), teacher=cfg.model, data=list(cfg.data), heldout=cfg.heldout,
                device=str(device), dtype=cfg.dtype, gradient_checkpointing=checkpointing,
                out=str(run_dir), max_tokens=plan.max_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                lr=lr, warmup_steps=plan.warmup_steps, eval_every=-1,
                exit_schedule=exit_schedule, hidden_weight=hidden_weight, trainable=trainable,
                # off: the peak is what is alive, as the memory plan counts it; on: no page faults a step
                reuse_freed_memory=cfg.reuse_freed_memory,
                eval_tokens=n_eval, save_every=plan.save_every, keep_last=1,
                max_time=plan.seconds, resume=run_dir.exists()), teacher=(teacher, tok))
        except TrainError as e:
            raise CompressError(str(e)) from e
        if result.get("interrupted"):
            run.save()
            raise KeyboardInterrupt
        return result

    # 4. distil: local (each position to its teacher layer), then global KD --------------------------
    local_dir = work / "local"
    start_from = converted
    if cfg.local_fraction > 0:
        start_from = local_dir
        if not (local_dir / "config.json").exists():
            local_time = local_seconds(cfg, costs, run.clock.left)
            run.stage(4, f"local distillation for {fmt_seconds(local_time)}")
            from ..conversion.calibrate import calibration_sequences
            from ..train.local import local_distill

            local_seqs = calibration_sequences(cfg.data, tok, cfg.local_tokens, cfg.seq_len)
            res = local_distill(student, teacher, local_seqs, lr=cfg.lr, batch_size=cfg.batch_size,
                                max_time=local_time)
            with atomic_dir(local_dir) as tmp:
                student.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            after_local = perplexity(student, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
            run.save(local_tokens=res["tokens"], local_steps=res["steps"], after_local=after_local)
            log(f"      {res['steps']} local steps ({res['tokens']} tokens): held-out perplexity {after_local:.4g}")
    del student
    release_freed_memory()  # the conversion's temporaries, before distillation's peak
    kd_dir = work / "kd"
    if not (kd_dir / "final_metrics.json").exists():
        kd = plan_distillation(cfg, costs, run.clock.left, state.max_tokens)
        if state.max_tokens is None:
            run.save(max_tokens=kd.max_tokens)
        run.stage(4, f"distilling from the teacher (KD) for up to {fmt_seconds(kd.seconds)}")
        result = distil(start_from, kd_dir, kd, cfg.lr, cfg.exit_schedule, cfg.hidden_weight)
        steps = [json.loads(x) for x in (kd_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        run.save(train_tokens=result["tokens"], train_steps=result["step"], train_tok_s=result.get("tokens_per_s"),
                 train_seconds=sum(r["step_s"] for r in steps))  # all attempts' steps, resumes included

    # 4b. the parameter-matched plain model, the same recipe (at its own lr) for the same time ------
    base_dir = work / "baseline"
    if cfg.baseline and not (base_dir / "final_metrics.json").exists():
        from ..conversion.baselines import matched

        init_dir = work / "baseline-init"
        if not (init_dir / "config.json").exists():
            with atomic_dir(init_dir) as tmp:
                matched(teacher, state.student_params).save_pretrained(tmp)
                tok.save_pretrained(tmp)
        seconds = state.train_seconds
        run.stage(4, f"distilling the parameter-matched plain model for the same {fmt_seconds(seconds)} (--baseline)")
        result = distil(init_dir, base_dir, distillation(cfg, costs, seconds, state.max_tokens), cfg.baseline_lr)
        run.save(baseline_tokens=result["tokens"], baseline_lr=cfg.baseline_lr)

    # 5. evaluate, write ----------------------------------------------------------------------------
    release_freed_memory()
    run.stage(5, "evaluating and writing the checkpoint")
    models = {"teacher": teacher.to(where.dtype), "student": load_pretrained(str(kd_dir), device=device, dtype=where.dtype)[0]}
    if cfg.baseline:
        models["baseline"] = load_pretrained(str(base_dir), device=device, dtype=where.dtype)[0]
    m = measure(models, tok, stream, cfg.seq_len, cfg.paper_tasks, log)
    summary = build_summary({**asdict(cfg), "trainable": trainable}, state, m, models, len(stream), run.clock.spent)
    with atomic_dir(out) as tmp:  # the compressed model; with --baseline the plain one in baseline/
        for src, dst in [(kd_dir, tmp)] + ([(base_dir, tmp / "baseline")] if cfg.baseline else []):
            dst.mkdir(exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and f.name not in ("train_config.json",):
                    shutil.copy2(f, dst / f.name)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        (tmp / "summary.md").write_text(render_summary(summary))
    shutil.rmtree(work, ignore_errors=True)
    log(render_summary(summary))
    return summary


__all__ = ["Clock", "compress"]
