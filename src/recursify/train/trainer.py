"""Uptraining a recursive student by knowledge distillation: one training loop, read top to bottom.

    python -m recursify.train.trainer --student runs/rec2 --teacher smollm2-135m \\
        --data corpus/python-docs/train --heldout corpus/python-docs/heldout --out runs/rec2-kd

The same entry point runs as one process, under ``accelerate launch`` and under ``torchrun``
(DDP; gloo on CPU, nccl on GPU); FSDP comes from an accelerate config (``fsdp_version: 2``; the
tests run it on 2 CPU processes, but accelerate itself enables FSDP only on GPUs). The flow of
:func:`train`:

1. setup: check every input (config values, output dir, student, teacher vocabulary, data,
   lengths) and raise :class:`TrainError` with one line *before* anything is written to ``out/``;
2. resume from the newest intact checkpoint in ``out/checkpoints`` if asked (:mod:`.checkpoint`);
3. step: teacher logits (no grad) -> student forward + loss (:mod:`.losses`) -> backward over
   ``grad_accum`` micro-batches -> clip -> AdamW -> LR schedule;
4. evaluate held-out perplexity (per exit) every ``eval_every`` steps; save a checkpoint every
   ``save_every`` steps and on SIGTERM/SIGINT;
5. save the final model as an ordinary recursify checkpoint in ``out/``.

Exactness of resume rests on three facts: batches are a pure function of (seed, step)
(:func:`recursify.data.batches`), the LR is a pure function of the step, and a checkpoint holds
the exact model and optimizer tensors. So a run killed at any point and resumed logs the same
per-step losses as one that never stopped (checked by tests/test_train.py with a real kill).

Signals: the first SIGTERM/SIGINT sets a flag; the step in flight finishes, a checkpoint is written,
and :func:`train` returns with ``interrupted`` set; ``main`` then exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), so schedulers see an unfinished run. A second SIGINT aborts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import latest_checkpoint, restore_model, restore_training_state, save_checkpoint, student_state
from .checks import check_out_dir as _check_out_dir, check_student as _check_student, load as _load
from .config import (RUN_IDENTITY, TrainConfig, TrainError, build_parser, fit_steps_to_time, lr_factor,
                     warn)
from .losses import LossConfig, TeacherLogits, distillation_loss, teacher_head
from .metrics import MetricsLog, evaluate, format_ppl, plot_metrics
from .optim import build_optimizer

__all__ = ["Distiller", "main", "train"]


class Distiller(nn.Module):
    """Student + loss in one forward, so DDP/FSDP see every parameter use (exits included) inside it."""

    def __init__(self, student: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg

    def forward(self, input_ids, teacher_logits=None, eval_exits: bool = False, teacher_hidden=None):
        if eval_exits:  # held-out CE of every exit, whatever the training schedule
            cfg = dataclasses.replace(self.loss_cfg, alpha=0.0, exit_schedule="none", hidden_weight=0.0)
            return distillation_loss(self.student, input_ids, None, cfg, all_exits=True)
        return distillation_loss(self.student, input_ids, teacher_logits, self.loss_cfg, teacher_hidden=teacher_hidden)


# ------------------------------------------------------------------------------------------------
# 1. Setup: every check before anything is written to out/
# ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the checks produced and every later phase reads: the processes, the models, the data."""

    cfg: TrainConfig
    accelerator: Any
    is_fsdp: bool
    micro: int  # sequences per forward on this process
    student: nn.Module
    tokenizer: Any
    teacher: nn.Module | None
    train_ds: Any
    heldout_ds: Any
    teacher_split: tuple | None = None  # `teacher_head(teacher)`: (decoder, head), or None to take whole logits


def _setup(cfg: TrainConfig, loaded_teacher=None, loaded_student=None) -> Setup:
    """Check every input, load both models and the data: a TrainError here leaves out/ untouched."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from ..data import DataConfig, DataError, build_datasets
    from ..hub import vocabulary_mismatch

    from ..util.device import DeviceError, resolve_dtype, resolve_placement

    cfg.validate()
    try:
        where = resolve_placement(cfg.device, cfg.dtype)
        teacher_dtype = where.dtype if cfg.teacher_dtype == "auto" else resolve_dtype(cfg.teacher_dtype, where.device)
    except DeviceError as e:
        raise TrainError(str(e)) from None
    _check_out_dir(cfg)
    if where.device.type == "cuda" and where.device.index is not None:
        torch.cuda.set_device(where.device)
    # Weights and optimizer state stay float32; the forward runs under autocast in the compute dtype.
    mp = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[where.dtype]
    try:
        accelerator = Accelerator(cpu=where.device.type == "cpu", mixed_precision=mp)
    except ValueError:  # one process, another run's precision: accelerate keeps it process-wide
        from accelerate.state import AcceleratorState, PartialState

        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=where.device.type == "cpu", mixed_precision=mp)
    world = accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(f"batch_size={cfg.batch_size} must be divisible by processes*grad_accum = "
                         f"{world}*{cfg.grad_accum}")
    set_seed(cfg.seed)

    student, tokenizer = loaded_student if loaded_student is not None else _load(cfg, cfg.student, "student")
    student.float()  # float32 master weights whatever the student was loaded in
    teacher = None
    if cfg.alpha > 0 or cfg.hidden_weight > 0:
        if loaded_teacher is not None:
            teacher, tok_t = loaded_teacher
            teacher.to(dtype=teacher_dtype)
        else:
            teacher, tok_t = _load(cfg, cfg.teacher, "teacher", teacher_dtype)
        problem = vocabulary_mismatch(student, tokenizer, teacher, tok_t)
        if problem:
            raise TrainError(f"teacher {cfg.teacher} {problem}; distillation needs the same tokenizer")
        teacher.requires_grad_(False).eval().to(accelerator.device)
    _check_student(student, teacher, cfg)  # before the data is tokenised
    if cfg.gradient_checkpointing:
        if not hasattr(student, "checkpoint_positions"):
            raise TrainError("gradient_checkpointing needs a recursive student")
        student.checkpoint_positions = True
    data_cfg = DataConfig(sources=cfg.data, seq_len=cfg.seq_len, heldout_fraction=cfg.heldout_fraction,
                          seed=cfg.seed, cache_dir=cfg.cache_dir, max_tokens=cfg.max_tokens,
                          heldout_sources=cfg.heldout, heldout_tokens=cfg.eval_tokens)
    try:
        with accelerator.main_process_first():  # tokenise once; the other ranks reuse the cache
            train_ds, heldout_ds = build_datasets(data_cfg, tokenizer)
    except DataError as e:
        raise TrainError(str(e)) from e
    if len(train_ds) < cfg.batch_size:
        raise TrainError(f"the training split has {len(train_ds)} sequences of {cfg.seq_len} tokens, fewer than one "
                         f"batch of {cfg.batch_size}; add data or lower batch_size/seq_len")
    return Setup(cfg, accelerator, accelerator.distributed_type == DistributedType.FSDP,
                 cfg.batch_size // (world * cfg.grad_accum), student, tokenizer, teacher, train_ds, heldout_ds,
                 teacher_head(teacher) if teacher is not None else None)


# ------------------------------------------------------------------------------------------------
# 2. Resume: out/ is written from here on
# ------------------------------------------------------------------------------------------------


def _open_out_dir(run: Setup) -> Path | None:
    """Create out/ (emptied by --overwrite) and save the config; the checkpoint to resume from, if any."""
    cfg, accelerator = run.cfg, run.accelerator
    out, main, ckpt = Path(cfg.out), accelerator.is_main_process, None
    if main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if cfg.resume:
        found = [str(latest_checkpoint(out) or "") if main else ""]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)  # only the main process verifies; everyone resumes from its pick
        ckpt = Path(found[0]) if found[0] else None
        old_cfg = out / "train_config.json"
        if main and old_cfg.exists():
            before = json.loads(old_cfg.read_text())
            changed = [k for k in RUN_IDENTITY if before.get(k) != cfg.to_dict().get(k)]
            if changed:
                warn(f"resuming with different {', '.join(changed)} than the original run; steps will not match it")
        if ckpt is None and main:
            warn(f"--resume: no intact checkpoint in {out / 'checkpoints'}; starting from step 0")
    if main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return ckpt


# ------------------------------------------------------------------------------------------------
# 3. Step and 4. evaluate
# ------------------------------------------------------------------------------------------------


def _teacher_outputs(run: Setup, ids: torch.Tensor):
    """(teacher logits, teacher hidden states or None) of one micro-batch. The logits come as
    `TeacherLogits` (final hidden state + head) where the teacher splits so: the loss then makes them
    a chunk at a time, and the [B, T, V] tensor is never whole."""
    hidden = run.cfg.hidden_weight > 0
    with torch.no_grad(), run.accelerator.autocast():  # bf16 on GPU, a no-op on CPU
        if run.teacher_split is None:
            out = run.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            return out.logits, out.hidden_states
        decoder, head = run.teacher_split
        out = decoder(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return TeacherLogits(out.last_hidden_state, head, run.student.config.vocab_size), out.hidden_states


def _step(run: Setup, model, optimizer, scheduler, clip_params, batch: torch.Tensor):
    """One optimizer step over `grad_accum` micro-batches: (loss/ce/kd of this rank, grad norm, LR)."""
    cfg, accelerator = run.cfg, run.accelerator
    stats = torch.zeros(3, device=accelerator.device)  # loss, ce, kd
    for i, ids in enumerate(batch.split(run.micro)):
        teacher_logits = teacher_hidden = None
        if run.teacher is not None:
            teacher_logits, teacher_hidden = _teacher_outputs(run, ids)
        last = i == cfg.grad_accum - 1
        with accelerator.no_sync(model) if not last else nullcontext():
            out = model(ids, teacher_logits, teacher_hidden=teacher_hidden)
            accelerator.backward(out["loss"] / cfg.grad_accum)
        stats += torch.stack([out["loss"].detach(), out["ce"], out["kd"]]).float() / cfg.grad_accum
        del teacher_logits, teacher_hidden, out
    grad_norm = accelerator.clip_grad_norm_(clip_params, cfg.clip if cfg.clip > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm, lr


# ------------------------------------------------------------------------------------------------
# 5. Save and the run
# ------------------------------------------------------------------------------------------------


def _save_final(run: Setup, model, result: dict) -> None:
    """The student as an ordinary recursify checkpoint in out/, its metrics and loss plot beside it."""
    accelerator, out = run.accelerator, Path(run.cfg.out)
    state = accelerator.get_state_dict(model)  # collective under FSDP
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).student.save_pretrained(out, state_dict=student_state(state))
        run.tokenizer.save_pretrained(out)
        (out / "final_metrics.json").write_text(json.dumps(result, indent=1))
        try:
            plot_metrics(out)
        except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
            warn(f"could not plot metrics: {e}")
    accelerator.wait_for_everyone()


def _catch_signals(stop: dict) -> dict:
    """First SIGTERM/SIGINT: note it, so the loop checkpoints and returns; a second SIGINT aborts."""

    def on_signal(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)
    return handlers


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None, *, teacher=None, student=None) -> dict:
    """Run (or resume) a distillation run; returns the final metrics.

    ``on_step(record)`` is called on every process after each optimizer step with that step's
    metrics record (for notebooks, tests, custom logging). ``teacher`` / ``student``: models already
    loaded, each as ``(model, tokenizer)``, used instead of reading ``cfg.teacher`` / ``cfg.student``
    (which then only name them in the run's config); they are moved to the run's device and dtypes
    in place, and the student is trained in place.
    """
    from ..cpu_heap import keep_freed_memory, return_freed_memory

    t_enter = time.perf_counter()  # on wall time, max_time counts from here: loading and the final saves too
    # Each step frees and allocates the same large buffers: keep them in the heap while the run's
    # tensors live (faster), or, when memory is short, give every freed buffer back at once.
    with keep_freed_memory() if cfg.reuse_freed_memory else return_freed_memory():
        return _train(cfg, on_step, t_enter, teacher, student)


def _train(cfg: TrainConfig, on_step: Callable[[dict], None] | None, t_enter: float, teacher=None, student=None) -> dict:
    from tqdm.auto import tqdm

    from ..data import batches

    run = _setup(cfg, teacher, student)
    accelerator, out = run.accelerator, Path(cfg.out)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    tokens_per_step, total_steps = cfg.batch_size * cfg.seq_len, cfg.total_steps

    ckpt = _open_out_dir(run)
    start_step = restore_model(ckpt, run.student, run.is_fsdp) if ckpt is not None else 0
    optimizer = build_optimizer(run.cfg, run.student)
    # `plan` holds the step count; with max_time it is re-fitted to the measured speed (see below).
    plan = {"total": total_steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, plan["total"]))
    loss_cfg = LossConfig(alpha=cfg.alpha, temperature=cfg.temperature, exit_schedule=cfg.exit_schedule,
                          hidden_weight=cfg.hidden_weight, chunk_elements=cfg.kd_chunk_elements)
    model, optimizer = accelerator.prepare(Distiller(run.student, loss_cfg), optimizer)
    if ckpt is not None:
        restore_training_state(ckpt, accelerator, model, optimizer, scheduler, run.is_fsdp)
    # Taken after prepare, all of them: FSDP swaps in sharded parameters, and accelerate clips an FSDP
    # model only when handed exactly model.parameters() (frozen ones have no grad and count nothing).
    clip_params = list(model.parameters())

    stop = {"signal": None}
    handlers = _catch_signals(stop)
    keep_until = (start_step if ckpt is not None else -1) if cfg.resume else None
    metrics = MetricsLog(out / "metrics.jsonl", main, keep_until)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and cfg.progress), file=sys.stderr)
    log = bar.write if (main and cfg.progress) else (lambda s: None)
    result: dict = {"out": str(out), "total_steps": total_steps, "interrupted": None}
    last_eval = None
    # The last evaluation's and checkpoint's durations: on wall time the deadline keeps room for the
    # final evaluation, the final checkpoint and the saved model, which come after the last step.
    timings = {"eval": 0.0, "save": 0.0, "saves": 0.0}
    try:
        if cfg.eval_every >= 0 and start_step == 0:
            t_eval = time.perf_counter()
            last_eval = evaluate(model, run.heldout_ds, cfg, accelerator, run.micro)
            timings["eval"] = time.perf_counter() - t_eval
            metrics.write({"kind": "eval", "step": 0, "tokens": 0, **last_eval})
            log(f"step 0: held-out ppl {format_ppl(last_eval)}")

        data = iter(())
        if start_step < plan["total"]:
            data = batches(run.train_ds, cfg.batch_size, cfg.seed, start_step=start_step, rank=rank, world_size=world)
        step, t_start, run_tokens, eval_s = start_step, time.perf_counter(), 0, 0.0
        while step < plan["total"]:
            t0 = time.perf_counter()
            batch = next(data)["input_ids"].to(accelerator.device)
            stats, grad_norm, lr = _step(run, model, optimizer, scheduler, clip_params, batch)
            step += 1
            stats = accelerator.reduce(stats, "mean") if world > 1 else stats
            dt = time.perf_counter() - t0
            run_tokens += tokens_per_step
            loss, ce, kd = stats.tolist()
            record = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": loss, "ce": ce,
                      "kd": kd, "lr": lr, "grad_norm": float(grad_norm), "tok_per_s": tokens_per_step / dt,
                      "step_s": dt}
            metrics.write(record)
            bar.update(1)
            train_s = time.perf_counter() - t_start - eval_s
            bar.set_postfix(loss=f"{loss:.4f}", kd=f"{kd:.4f}", tok_s=f"{run_tokens / train_s:.0f}")
            if cfg.max_time > 0 and ((step - start_step) % 3 == 0 or step - start_step == 1):  # long steps: from the first
                now = time.perf_counter()
                steps_s = now - t_start - (eval_s if cfg.eval_pauses_clock else 0.0)
                per_step = (steps_s - timings["saves"]) / (step - start_step)  # checkpoints where they fall
                if cfg.eval_pauses_clock:
                    left = cfg.max_time - steps_s
                else:
                    finish = 2 * timings["save"] + (timings["eval"] if cfg.eval_every >= 0 else 0.0)
                    left = cfg.max_time - (now - t_enter) - finish
                fitted = fit_steps_to_time(step, left, per_step, total_steps, cfg.save_every, timings["save"])
                if world > 1:  # every rank must run the same number of steps
                    fitted = int(accelerator.reduce(torch.tensor([fitted], device=accelerator.device), "min").item())
                plan["total"] = fitted
                bar.total = fitted
            if not math.isfinite(loss):
                raise TrainError(f"loss became {loss} at step {step}; lower the learning rate")
            if on_step is not None:
                on_step(record)

            if cfg.eval_every > 0 and step % cfg.eval_every == 0 or (cfg.eval_every >= 0 and step == plan["total"]):
                t_eval = time.perf_counter()
                last_eval = evaluate(model, run.heldout_ds, cfg, accelerator, run.micro)
                timings["eval"] = time.perf_counter() - t_eval
                eval_s += timings["eval"]
                metrics.write({"kind": "eval", "step": step, "tokens": step * tokens_per_step, **last_eval})
                log(f"step {step}: held-out ppl {format_ppl(last_eval)}")

            signum = stop["signal"] or 0
            if world > 1:  # every rank must stop at the same step
                signum = int(accelerator.reduce(torch.tensor([signum], device=accelerator.device), "sum").item())
            periodic = cfg.save_every > 0 and step % cfg.save_every == 0
            if periodic or (step == plan["total"] and cfg.save_every >= 0) or signum:
                t_save = time.perf_counter()
                path = save_checkpoint(out, step, step * tokens_per_step, accelerator, model, optimizer, scheduler,
                                       cfg.keep_last, run.is_fsdp)
                timings["save"] = time.perf_counter() - t_save
                timings["saves"] += timings["save"]
                log(f"saved {path}")
            if signum:
                sig_name = signal.Signals(stop["signal"] or signal.SIGTERM).name
                result["interrupted"] = sig_name
                result["exit_code"] = 128 + int(stop["signal"] or signal.SIGTERM)
                log(f"{sig_name}: checkpoint at step {step} written; resume with --resume")
                break

        result.update(step=step, tokens=step * tokens_per_step, total_steps=plan["total"])
        if step > start_step:
            result.update(loss=loss, ce=ce, kd=kd, tokens_per_s=run_tokens / train_s)
        if last_eval:
            result.update(eval_loss=last_eval["loss"], eval_ppl=last_eval["ppl"], exit_ppl=last_eval["exit_ppl"])
        if result["interrupted"] is None:
            _save_final(run, model, result)
    finally:
        bar.close()
        metrics.close()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        result = train(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.get("interrupted"):
        return int(result["exit_code"])
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    summary = {k: result[k] for k in ("step", "tokens", "loss", "eval_ppl", "exit_ppl") if k in result}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
