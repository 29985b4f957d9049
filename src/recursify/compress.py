"""`recursify compress`: the one-command recipe, from a pretrained model to a usable smaller one.

calibrate -> convert (activation-aware LoRA init) -> distil within the time budget -> evaluate ->
an ordinary recursify checkpoint with `summary.md` / `summary.json` beside the weights. Every stage
is the library's own code (the trainer is the trainer); this module only sequences them, keeps the
clock, and resumes: its work folder `.<out>.work/` survives a kill and is removed on success.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .budget import Clock, conversion_scale, parse_duration, convert_forwards as _convert_forwards, curvature_forwards as _curvature_forwards
from .compress_summary import fmt_seconds as _fmt_s
from .compress_summary import build_summary, measure, render_summary
from .cpu_heap import release_freed_memory


class CompressError(ValueError):
    """A compress request that cannot give a model; one line meant for the user."""


@dataclass
class CompressConfig:
    model: str = "smollm2-135m"
    out: str = "runs/compressed"
    data: list[str] = field(default_factory=lambda: ["corpus/python-docs/train"])
    heldout: list[str] | None = None  # default: a held-out fraction of `data`'s documents
    loops: int | str = "auto"  # or a number: "auto" keeps the loop count (and rank) whose calibrated conversion is best
    strategy: str = "cycle"
    init: str = "calibrated"  # layouts are compared with "average" (cheaper); the chosen one gets this
    lora_rank: int | str | None = None  # None: 64, or what fills target_params with loops="auto"; "auto": per-linear ranks
    target_params: float | None = None  # with lora_rank or loops "auto": fraction of the teacher's parameters
    # (with loops "auto", None means DEFAULT_TARGET)
    time_budget: float = 3600.0  # seconds, everything included
    calib_tokens: int = 16_384
    damp: float = 0.01
    sequential: bool = True  # refit the LoRA position by position on the student's own inputs
    curvature: bool = True  # also weigh the LoRA fits' output directions by the teacher's output curvature
    allocate: bool = True  # with loops "auto" and the curvature: per-linear ranks of the chosen layout's size
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-4  # below the trainer's 3e-4: a calibrated start is close enough that 3e-4 undoes part of it
    max_tokens: int | None = None  # training tokens at most (default: what the budget can use)
    local_fraction: float = 0.0  # share of the training time spent on local distillation before KD
    local_tokens: int = 65_536  # training tokens the local stage cycles over
    exit_schedule: str = "none"  # early-exit losses at loop ends during KD (see recursify train)
    hidden_weight: float = 0.0  # hidden-state distillation: each position also learns its teacher layer's output
    trainable: str = "all"  # what KD trains (recursify train --trainable); the baseline trains the same set
    eval_tokens: int = 4096
    baseline: bool = False  # also distil the parameter-matched plain model for the same training time
    baseline_lr: float = 1e-3  # its own peak LR: the plain model's best in the sweep of docs/results
    paper_tasks: int = 0  # items per task of the paper's seven benchmarks to evaluate (0: none)
    overwrite: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # compute dtype of distillation and evaluation (auto: bf16 on GPUs, fp32 on CPU)
    gradient_checkpointing: str = "auto"  # auto: on when the plan's memory estimate does not fit without it
    max_compute: float | None = None  # --loops auto: layouts' multiply-adds per token, as a fraction of the teacher's

    def validate(self) -> None:
        if self.time_budget <= 0:
            raise CompressError(f"--time-budget must be positive, got {self.time_budget}")
        from .train.losses import EXIT_SCHEDULES

        if self.exit_schedule not in EXIT_SCHEDULES:
            raise CompressError(f"--exit-schedule must be one of {', '.join(EXIT_SCHEDULES)}, got {self.exit_schedule!r}")
        if self.trainable not in ("all", "body"):
            raise CompressError(f"--trainable must be all or body (see recursify train for the others), got {self.trainable!r}")
        if not self.hidden_weight >= 0:
            raise CompressError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        if self.paper_tasks < 0:
            raise CompressError(f"--paper-tasks is a number of items per task (0: none), got {self.paper_tasks}")
        for name in ("calib_tokens", "seq_len", "batch_size", "eval_tokens"):
            if getattr(self, name) < 1:
                raise CompressError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.baseline_lr > 0):
            raise CompressError(f"--lr and --baseline-lr must be positive, got {self.lr} and {self.baseline_lr}")
        if not 0 <= self.local_fraction < 1:
            raise CompressError(f"--local-fraction must be in [0, 1), got {self.local_fraction}")
        if self.loops != "auto" and not isinstance(self.loops, int):
            raise CompressError(f"--loops must be a number of loops or auto, got {self.loops!r}")
        if self.loops == "auto" and self.lora_rank not in (None, "auto"):
            raise CompressError(f"--lora-rank {self.lora_rank} needs a number of loops (e.g. --loops 2): --loops auto, "
                                "the default, chooses the rank with the loops (--lora-rank auto: per-linear ranks)")
        if self.loops == "auto" and self.target_params is None:
            self.target_params = DEFAULT_TARGET
        if (self.lora_rank == "auto" or self.loops == "auto") != (self.target_params is not None):
            raise CompressError("--target-params goes with --lora-rank auto or --loops auto: the budget decides the "
                                "ranks (and loops)")
        if self.max_compute is not None and (self.loops != "auto" or not self.max_compute > 0):
            raise CompressError("--max-compute (a positive fraction of the teacher's multiply-adds per token) goes "
                                f"with --loops auto, got {self.max_compute} with --loops {self.loops}")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise CompressError(f"--gradient-checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")
        if self.eval_tokens < 2 * self.seq_len:
            raise CompressError(f"--eval-tokens={self.eval_tokens} must cover two sequences of {self.seq_len}")


SEARCH_TOKENS = 2048  # training tokens each --loops auto candidate is scored on
DEFAULT_TARGET = 0.75  # the student's size with --loops auto and no --target-params

# What only decides what is measured at the end: a resumed run may add or drop it.
EVALUATION_ONLY = ("overwrite", "baseline", "baseline_lr", "paper_tasks")


def _identity(config: dict) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    return {k: v for k, v in config.items() if k not in EVALUATION_ONLY}


def compress(cfg: CompressConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the recipe; returns the summary written to `out/summary.json`.

    A bad request fails with CompressError and leaves nothing behind (a resumable work folder
    from an earlier attempt is kept); an interruption keeps the work folder for the next call.
    """
    out = Path(cfg.out)
    work = out.parent / f".{out.name}.work"
    fresh = not (work / "state.json").exists() or cfg.overwrite
    try:
        return _compress(cfg, out, work, log)
    except CompressError:
        if fresh:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _check_memory(cfg: CompressConfig, source_config, recursion, where, log):
    """Print each stage's estimated peak memory; refuse, before any work, a run that cannot fit."""
    from .budget import fit_memory
    from .util.memory import fmt_gib

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


def _compress(cfg: CompressConfig, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    import recursify as rf

    from .conversion.calibrate import cached_stats, calibration_sequences, stats_path
    from .conversion.recipe import calibrated_convert
    from .eval.metrics import perplexity
    from .hub import atomic_dir, cache_root, load_pretrained
    from .data import DataConfig, DataError, build_datasets
    from .data.sources import resolve_sources
    from .train.trainer import TrainConfig, TrainError, train

    cfg.validate()
    from .util.device import DeviceError, resolve_placement

    try:
        where = resolve_placement(cfg.device, cfg.dtype)
    except DeviceError as e:
        raise CompressError(str(e)) from None
    if cfg.paper_tasks and __import__("importlib.util").util.find_spec("lm_eval") is None:
        raise CompressError("--paper-tasks needs lm-evaluation-harness: pip install 'recursify[eval]'")
    try:  # the layout and the model's family, before anything is loaded or written
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
    memory = _check_memory(cfg, source_config, recursion, where, log)
    checkpointing, curvature_fits = memory.checkpointing, memory.curvature
    trainable = "body" if memory.frozen_embeddings else cfg.trainable
    if cfg.overwrite and work.exists():
        shutil.rmtree(work)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and _identity(state.get("config", {})) != _identity(asdict(cfg)):
        raise CompressError(f"{work} holds an interrupted run with other settings; pass --overwrite to start afresh")
    clock = Clock(cfg.time_budget, state.get("spent", 0.0))
    resumed = bool(state)
    work.mkdir(parents=True, exist_ok=True)

    def save_state(**kw):
        state.update(kw, config=_identity(asdict(cfg)), spent=clock.spent)
        state_file.write_text(json.dumps(state, indent=1))

    def stage(i: int, text: str):
        log(f"[{i}/5] {text}  ({_fmt_s(clock.spent)} of {_fmt_s(clock.budget)} spent)")
    save_state()
    if resumed:
        log(f"resuming the interrupted run in {work}")

    # 1. teacher, data -----------------------------------------------------------------------------
    stage(1, f"loading {cfg.model} and the data")
    device = where.device
    teacher, tok = load_pretrained(cfg.model, device=device)  # float32: calibration and conversion maths
    options = []
    # Layouts are compared with the average init, since the joint calibrated fit costs four plain
    # conversions' time; the chosen layout is then converted with cfg.init.
    search_init = "average" if cfg.init == "calibrated" else cfg.init
    if auto_loops:  # the layouts that fit the budget, known before calibration
        from .conversion.layout_search import candidates

        try:
            options = candidates(teacher, cfg.target_params, cfg.strategy, search_init, max_compute=cfg.max_compute)
        except ValueError as e:
            raise CompressError(str(e)) from e
    elif auto:  # a budget that even rank 0 exceeds fails now, not after calibration
        from .conversion.allocate import parameter_count

        floor = parameter_count(teacher, recursion) / sum(p.numel() for p in teacher.parameters())
        if floor > cfg.target_params:
            raise CompressError(f"--target-params {cfg.target_params:g} is below what even rank 0 needs "
                                f"({floor:.1%} of the teacher's parameters): use more loops or a larger target")
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
    if "teacher_ppl" not in state:  # also measures this machine's forward speed, for the plan below
        t0 = time.monotonic()
        teacher_ppl = perplexity(teacher, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
        save_state(teacher_ppl=teacher_ppl, fwd_tok_s=len(stream) / max(time.monotonic() - t0, 1e-6))
    fwd = state["fwd_tok_s"]
    reserve = (6 * n_eval + 3000) / fwd + 5  # final evaluation, generations (~150 decode steps), saving
    step_s = 5 * cfg.batch_size * cfg.seq_len / fwd  # a KD step costs about five forwards
    sequential = cfg.sequential and state.get("sequential", True)
    curvature = cfg.curvature and curvature_fits and state.get("curvature", True)
    if not (converted / "config.json").exists():
        # Fit the preparation to the budget: no layout search, then no output curvature, then fewer calibration
        # tokens (down to 2048), then average init, then no sequential refit, before giving up. Statistics cost
        # about 4 forwards per token (nothing when cached), the refit 12; a conversion `_convert_forwards`.
        calib_tokens, searching, init = cfg.calib_tokens, auto_loops, cfg.init
        n_probe = max(1, SEARCH_TOKENS // cfg.seq_len)
        while True:
            # The layouts are scored on text held out of the statistics: scored on the text they
            # were fitted to, high ranks look best however little calibration text there is.
            seqs = calibration_sequences(cfg.data, tok, calib_tokens + (SEARCH_TOKENS if searching else 0), cfg.seq_len)
            beyond = len(seqs) - calib_tokens // cfg.seq_len  # rows past the calibration text
            held = (min(n_probe, beyond) if beyond > 0 else len(seqs) // 2) if searching else 0  # short text: halves
            seqs, probe = (seqs[:-held], seqs[-held:]) if held else (seqs, seqs[-n_probe:])
            cached = stats_path(teacher, seqs, cache_root() / "calibration").exists()
            convert_s = _convert_forwards(init, scale) / fwd
            search_s = len(options) * _convert_forwards(search_init, scale) / fwd if searching else 0
            prep = (0 if cached else 4 * seqs.numel() / fwd) + convert_s + search_s
            refit = 12 * min(8192, seqs.numel()) / fwd if sequential else 0
            refit += _curvature_forwards(min(8192, seqs.numel()), sequential) / fwd if curvature else 0
            if clock.left >= prep + refit + reserve + 10 * step_s or not (searching or curvature or calib_tokens > 2048):
                break
            if curvature and not searching:  # the most expensive part per unit of gain
                log("      the budget is too short for the output curvature; fitting input-side only "
                    "(raise --time-budget to keep it)")
                curvature = False
            elif searching:
                from .conversion.layout_search import without_search

                pick = without_search(teacher, options)
                log(f"      the budget is too short to compare {len(options)} layouts; using {pick.loops} loops at "
                    f"rank {pick.rank} (raise --time-budget to let it choose)")
                searching, recursion = False, pick.recursion
            else:
                calib_tokens = max(2048, calib_tokens // 2)
        if calib_tokens < cfg.calib_tokens:
            log(f"      calibrating on {calib_tokens} tokens instead of {cfg.calib_tokens} to fit the budget")
        if init == "calibrated" and clock.left < prep + refit + reserve + 10 * step_s:
            log("      the budget is too short for the calibrated shared-weight fit; using average init "
                "(raise --time-budget to keep it)")
            prep -= (_convert_forwards(init, scale) - _convert_forwards("average", scale)) / fwd
            init = "average"
        if sequential and clock.left < prep + refit + reserve + 10 * step_s:
            log("      the budget is too short for the sequential refit; skipping it (raise --time-budget to keep it)")
            sequential = False
        if clock.left < prep + reserve + step_s:
            raise CompressError(f"the time budget ({_fmt_s(cfg.time_budget)}) cannot fit calibration (about "
                                f"{_fmt_s(prep)} here) and one training step; raise --time-budget")
        save_state(sequential=sequential, curvature=curvature)
        stage(2, f"calibrating on {seqs.numel()} tokens")
        t0 = time.monotonic()
        stats = cached_stats(teacher, seqs, cache_root() / "calibration")
        fit_seqs = seqs[: max(1, 8192 // cfg.seq_len)]  # the sequential refit's and the curvature's tokens
        if searching:
            from .conversion.layout_search import candidates, search

            stage(3, f"choosing the loops for {cfg.target_params:.0%} of the teacher's parameters: converting "
                     f"{len(options)} layouts and scoring them on {SEARCH_TOKENS} training tokens")
            if auto:
                options = candidates(teacher, cfg.target_params, cfg.strategy, search_init, stats, allocate=True,
                                     damp=cfg.damp, max_compute=cfg.max_compute)
            best = search(teacher, stats, probe, options, cfg.seq_len, damp=cfg.damp, log=log)
            recursion = best.recursion
            save_state(layout_search=[{"loops": c.loops, "rank": c.rank, "params": c.params, "ppl": c.ppl}
                                      for c in options])
            log(f"      chose {best.loops} loops, rank {best.rank}")
        recursion = dataclasses.replace(recursion, init=init)
        # Per-linear ranks; with the curvature, by the distillation loss each component removes (the
        # search already allocated its layouts' ranks without it); "same": the chosen layout's size.
        allocate = (auto and not searching) or (curvature and (auto or (auto_loops and cfg.allocate)))
        try:
            student = calibrated_convert(
                teacher, recursion, stats, fit_seqs, sequential=sequential, curvature=curvature,
                allocate_to=(cfg.target_params if auto else "same") if allocate else None, damp=cfg.damp,
                device=device, progress=True, log=lambda line: log("      " + line),
                announce=lambda r: stage(3, f"converting: {r.num_loops} loops, {cfg.strategy}, init {init}, rank "
                                            f"{r.rank_text}, calibrated" + (" on both sides" if curvature else "")
                                            + (", then sequential refit" if sequential else "")))
        except ValueError as e:
            raise CompressError(str(e)) from e
        with atomic_dir(converted) as tmp:
            student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        save_state(calib_seconds=time.monotonic() - t0)
    else:
        student, _ = load_pretrained(str(converted), device=device)
    if "before" not in state:
        before = perplexity(student, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
        save_state(before=before, student_params=student.parameter_breakdown()["total"])
        log(f"      held-out perplexity: teacher {state['teacher_ppl']:.2f}, converted (no training) {before:.4g}")

    def distil(student: Path, run_dir: Path, seconds: float, max_tokens: int, lr: float, exit_schedule: str = "none",
               hidden_weight: float = 0.0) -> dict:
        """The ordinary trainer, KD from the teacher for `seconds`; resumes a killed run. At least 5
        warm-up steps: Adam's first steps move every weight by about the full rate."""
        steps_guess = max(1, min(int(seconds / step_s), max_tokens // (cfg.batch_size * cfg.seq_len)))
        try:
            result = train(TrainConfig(
                student=str(student), teacher=cfg.model, data=list(cfg.data), heldout=cfg.heldout,
                device=str(device), dtype=cfg.dtype, gradient_checkpointing=checkpointing,
                out=str(run_dir), max_tokens=max_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                lr=lr, warmup_steps=min(20, max(5, steps_guess // 10)), eval_every=-1,
                exit_schedule=exit_schedule, hidden_weight=hidden_weight, trainable=trainable,
                reuse_freed_memory=memory.reuse_freed_memory,
                eval_tokens=n_eval, save_every=max(10, steps_guess // 10), keep_last=1,
                max_time=seconds, resume=run_dir.exists()), teacher=(teacher, tok))
        except TrainError as e:
            raise CompressError(str(e)) from e
        if result.get("interrupted"):
            save_state()
            raise KeyboardInterrupt
        return result

    # 4. distil: local (each position to its teacher layer), then global KD --------------------------
    local_dir = work / "local"
    start_from = converted
    if cfg.local_fraction > 0:
        start_from = local_dir
        if not (local_dir / "config.json").exists():
            local_time = cfg.local_fraction * (clock.left - reserve)
            stage(4, f"local distillation for {_fmt_s(local_time)}")
            from .train.local import local_distill

            local_seqs = calibration_sequences(cfg.data, tok, cfg.local_tokens, cfg.seq_len)
            res = local_distill(student, teacher, local_seqs, lr=cfg.lr, batch_size=cfg.batch_size,
                                max_time=local_time)
            with atomic_dir(local_dir) as tmp:
                student.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            after_local = perplexity(student, stream, context_len=cfg.seq_len, stride=cfg.seq_len)["ppl"]
            save_state(local_tokens=res["tokens"], local_steps=res["steps"], after_local=after_local)
            log(f"      {res['steps']} local steps ({res['tokens']} tokens): held-out perplexity {after_local:.4g}")
    del student
    release_freed_memory()  # the conversion's temporaries, before distillation's peak
    train_time = clock.left - reserve
    kd_dir = work / "kd"
    if not (kd_dir / "final_metrics.json").exists():
        if train_time < step_s:
            raise CompressError(
                f"the time budget leaves {max(0, train_time):.0f} s for training, less than one step "
                f"(about {step_s:.0f} s here); raise --time-budget")
        if "max_tokens" not in state:
            save_state(max_tokens=cfg.max_tokens or max(cfg.batch_size * cfg.seq_len,
                                                          int(2 * train_time / step_s) * cfg.batch_size * cfg.seq_len))
        stage(4, f"distilling from the teacher (KD) for up to {_fmt_s(train_time)}")
        result = distil(start_from, kd_dir, train_time, state["max_tokens"], cfg.lr, cfg.exit_schedule, cfg.hidden_weight)
        steps = [json.loads(x) for x in (kd_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        save_state(train_tokens=result["tokens"], train_steps=result["step"], train_tok_s=result.get("tokens_per_s"),
                   train_seconds=sum(r["step_s"] for r in steps))  # all attempts' steps, resumes included

    # 4b. the parameter-matched plain model, the same recipe (at its own lr) for the same time ------
    base_dir = work / "baseline"
    if cfg.baseline and not (base_dir / "final_metrics.json").exists():
        from .conversion.baselines import matched

        init_dir = work / "baseline-init"
        if not (init_dir / "config.json").exists():
            with atomic_dir(init_dir) as tmp:
                matched(teacher, state["student_params"]).save_pretrained(tmp)
                tok.save_pretrained(tmp)
        seconds = state["train_seconds"]
        stage(4, f"distilling the parameter-matched plain model for the same {_fmt_s(seconds)} (--baseline)")
        result = distil(init_dir, base_dir, seconds, state["max_tokens"], cfg.baseline_lr)
        save_state(baseline_tokens=result["tokens"], baseline_lr=cfg.baseline_lr)

    # 5. evaluate, write ----------------------------------------------------------------------------
    release_freed_memory()
    stage(5, "evaluating and writing the checkpoint")
    models = {"teacher": teacher.to(where.dtype), "student": load_pretrained(str(kd_dir), device=device, dtype=where.dtype)[0]}
    if cfg.baseline:
        models["baseline"] = load_pretrained(str(base_dir), device=device, dtype=where.dtype)[0]
    m = measure(models, tok, stream, cfg.seq_len, cfg.paper_tasks, log)
    summary = build_summary({**asdict(cfg), "trainable": trainable}, state, m, models, len(stream), clock.spent)
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


__all__ = ["CompressConfig", "CompressError", "compress", "parse_duration", "render_summary"]
