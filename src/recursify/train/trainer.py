"""Uptraining a recursive student by knowledge distillation: one training loop, read top to bottom.

    python -m recursify.train.trainer --student runs/rec2 --teacher smollm2-135m \\
        --data corpus/python-docs/train --heldout corpus/python-docs/heldout --out runs/rec2-kd

The same entry point runs as one process, under ``accelerate launch`` and under ``torchrun``
(DDP; gloo on CPU, nccl on GPU); FSDP comes from an accelerate config (``fsdp_version: 2``; the
tests run it on 2 CPU processes, but accelerate itself enables FSDP only on GPUs). The flow of
:func:`train`:

1. check every input (config values, output dir, student, teacher vocabulary, data, lengths) and
   raise :class:`TrainError` with one line *before* anything is written to ``out/``;
2. resume from the newest intact checkpoint in ``out/checkpoints`` if asked;
3. loop: teacher logits (no grad) -> student forward + loss (:mod:`.losses`) -> backward over
   ``grad_accum`` micro-batches -> clip -> AdamW -> LR schedule; held-out perplexity (per exit)
   every ``eval_every`` steps, a checkpoint every ``save_every`` steps and on SIGTERM/SIGINT;
4. save the final model as an ordinary recursify checkpoint in ``out/``.

Exactness of resume rests on three facts: batches are a pure function of (seed, step)
(:func:`~recursify.train.data.batches`), the LR is a pure function of the step, and a checkpoint
holds the exact model and optimizer tensors. So a run killed at any point and resumed logs the same
per-step losses as one that never stopped (checked by tests/test_train.py with a real kill).

Signals: the first SIGTERM/SIGINT sets a flag; the step in flight finishes, a checkpoint is
written, and :func:`train` returns with ``interrupted`` set; ``main`` then exits with 128 + the
signal number (143 for SIGTERM, 130 for SIGINT), so schedulers see an unfinished run. A second
SIGINT aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .losses import EXIT_SCHEDULES, LossConfig, distillation_loss

__all__ = ["TrainConfig", "TrainError", "train", "main", "latest_checkpoint", "list_checkpoints"]

SCHEDULES = ("cosine", "wsd")
TRAINABLE = ("all", "lora", "shared", "norms")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIXED_PRECISION = ("auto", "no", "bf16")
CHECKPOINT_PREFIX = "step-"
# Fields that change the data order or the LR at a given step: a resume with other values is not
# the same run any more, so we warn.
_RUN_IDENTITY = ("data", "heldout", "max_tokens", "seq_len", "batch_size", "seed", "lr", "schedule",
                 "warmup_steps", "min_lr", "alpha", "temperature", "exit_schedule", "trainable")


class TrainError(ValueError):
    """Bad training input; the message is one line meant for the user."""


def _f(default, help: str, **kw):
    """A dataclass field that carries its help text (used for the docs and the argparse flags)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``out/train_config.json``."""

    student: str = _f("", "Student to train: a recursify checkpoint folder (from `recursify convert`) or any causal LM "
                          "folder/.gguf/bundled name.")
    out: str = _f("runs/train", "Output folder: final model, metrics.jsonl, loss.png, checkpoints/.")
    teacher: str | None = _f("smollm2-135m", "Teacher model (bundled name, folder or .gguf); 'none' for CE-only "
                                             "training (needs alpha=0). Not loaded when alpha=0.")
    data: list[str] = _f(["corpus/python-docs/train"], "Training text: files/folders (.txt .md .rst .jsonl or a "
                                                       "datasets folder).")
    heldout: list[str] | None = _f(None, "Held-out sources; default: a heldout_fraction of the data's documents.")
    heldout_fraction: float = _f(0.05, "Fraction of documents held out when --heldout is not given.")
    cache_dir: str | None = _f(None, "Token cache folder (default $RECURSIFY_CACHE/tokens or ~/.cache/recursify/tokens).")
    max_tokens: int = _f(1_000_000, "Training budget in tokens; steps = max_tokens // (batch_size * seq_len). Also "
                                    "caps how much of the data is tokenised (one epoch at most).")
    seq_len: int = _f(512, "Tokens per sequence.")
    batch_size: int = _f(16, "GLOBAL batch in sequences per optimizer step (over all processes and micro-batches).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (per process); batch_size must divide by "
                            "processes * grad_accum.")
    lr: float = _f(3e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms, biases and diagonals).")
    warmup_steps: int = _f(20, "Linear warm-up steps.")
    schedule: str = _f("cosine", "LR schedule after warm-up: cosine (to min_lr) or wsd (constant, then linear decay "
                                 "to min_lr over the last decay_fraction of steps).")
    min_lr: float = _f(0.1, "Final LR as a fraction of lr.")
    decay_fraction: float = _f(0.2, "wsd: fraction of steps spent decaying.")
    clip: float = _f(1.0, "Gradient-norm clip (0: off).")
    alpha: float = _f(1.0, "Loss = alpha * KD + (1 - alpha) * CE; 1: KD only, 0: CE only (no teacher needed).")
    temperature: float = _f(1.0, "KD temperature T (the KL is scaled by T^2).")
    exit_schedule: str = _f("none", "Early-exit losses at every loop end: none, weighted (i / sum j), aggressive "
                                    "(0.1 intermediate, 1 last), self_kd (intermediate exits distil the detached "
                                    "final exit).")
    post_train_exits: bool = _f(False, "Continue an uptrained model to train its early exits: forces exit_schedule "
                                       "to self_kd unless it is aggressive or self_kd.")
    trainable: str = _f("all", "What to train: all, lora (LoRA and residual diagonals only), shared (slots.* only), "
                               "norms (norms, biases, LoRA, diagonals).")
    teacher_dtype: str = _f("float32", "Teacher weights dtype: float32 or bfloat16 (halves its memory).")
    mixed_precision: str = _f("auto", "Student autocast: auto (bf16 on GPU, fp32 on CPU), no, bf16.")
    eval_every: int = _f(200, "Held-out evaluation every N steps (0: only at the start and end; -1: never).")
    eval_tokens: int = _f(65536, "Held-out tokens per evaluation (rounded down to whole sequences).")
    save_every: int = _f(500, "Checkpoint every N steps (0: only at the end and on signals; -1: only on signals, "
                              "for short runs whose final model is all that is kept).")
    keep_last: int = _f(2, "Checkpoints kept (older ones are deleted).")
    seed: int = _f(0, "Seed of the data order and of torch/numpy/random.")
    resume: bool = _f(False, "Continue from the newest intact checkpoint in out/checkpoints (fresh start if none).")
    overwrite: bool = _f(False, "Delete out/ first if it exists.")
    progress: bool = _f(True, "Show a tqdm progress bar (main process).")
    max_time: float = _f(0.0, "Wall-clock budget in seconds for the training steps (0: none). The run ends by then with "
                              "a finished model: after a few steps the step count is re-fitted to the measured step "
                              "time (never above max_tokens' steps), so the LR schedule decays by the deadline.")
    kd_chunk_elements: int = _f(1 << 26, "Logit elements (rows x vocab) per loss chunk: lower it to save memory.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Value checks that need no file or model; raise TrainError with one line."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainError(msg)

        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.heldout, str):
            self.heldout = [self.heldout]
        if isinstance(self.teacher, str) and self.teacher.lower() in ("", "none"):
            self.teacher = None
        need(bool(self.student), "no student given: pass a recursify checkpoint folder (from `recursify convert`)")
        need(bool(self.data), "no training data given")
        for name in ("seq_len", "batch_size", "grad_accum", "max_tokens", "keep_last"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        need(0 <= self.min_lr <= 1, f"min_lr is a fraction of lr and must be in [0, 1], got {self.min_lr}")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        need(self.clip >= 0, f"clip must be >= 0, got {self.clip}")
        need(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        need(self.exit_schedule in EXIT_SCHEDULES,
             f"unknown exit_schedule {self.exit_schedule!r}; choose one of {', '.join(EXIT_SCHEDULES)}")
        need(self.trainable in TRAINABLE, f"unknown trainable {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        need(self.teacher_dtype in TEACHER_DTYPES,
             f"unknown teacher_dtype {self.teacher_dtype!r}; choose one of {', '.join(TEACHER_DTYPES)}")
        need(self.mixed_precision in MIXED_PRECISION,
             f"unknown mixed_precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        need(self.eval_tokens >= 1, f"eval_tokens must be positive, got {self.eval_tokens}")
        need(self.save_every >= -1, f"save_every must be >= -1, got {self.save_every}")
        need(self.max_time >= 0, f"max_time must be >= 0 seconds, got {self.max_time}")
        need(self.kd_chunk_elements >= 1, f"kd_chunk_elements must be positive, got {self.kd_chunk_elements}")
        need(self.alpha == 0 or self.teacher is not None, f"alpha={self.alpha} needs a teacher; pass --teacher or --alpha 0")
        need(not (self.resume and self.overwrite), "pass only one of resume and overwrite")
        tokens_per_step = self.batch_size * self.seq_len
        need(self.max_tokens >= tokens_per_step,
             f"max_tokens={self.max_tokens} is smaller than one global batch (batch_size*seq_len = {self.batch_size}*"
             f"{self.seq_len} = {tokens_per_step}); raise max_tokens or lower batch_size/seq_len")
        if self.post_train_exits and self.exit_schedule not in ("aggressive", "self_kd"):
            self.exit_schedule = "self_kd"

    @property
    def total_steps(self) -> int:
        return self.max_tokens // (self.batch_size * self.seq_len)


# ------------------------------------------------------------------------------------------------
# Small pieces the loop uses
# ------------------------------------------------------------------------------------------------


def fit_steps_to_time(step: int, seconds_left: float, seconds_per_step: float, max_steps: int) -> int:
    """The step count that ends a time-budgeted run by its deadline: at least one more step, at
    most `max_steps`. Evaluation time is already inside `seconds_per_step` (it is wall time)."""
    more = int(max(0.0, seconds_left) / max(seconds_per_step, 1e-9))
    return max(step + 1, min(max_steps, step + more))


def lr_factor(step: int, cfg: TrainConfig, total: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): warm-up, then cosine or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - cfg.min_lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def _is_trainable(name: str, mode: str) -> bool:
    """Parameter groups by name: slots.* shared weights, lora.*/diag.* relaxation, the rest embeddings/norms/head."""
    if mode == "all":
        return True
    if mode == "lora":
        return name.startswith(("lora.", "diag."))
    if mode == "shared":
        return name.startswith("slots.")
    return name.startswith(("lora.", "diag.", "norm_", "bias.", "final_norm"))  # norms


def _decays(name: str) -> bool:
    """No weight decay on norms, biases and diagonals (they are gains/offsets, not projections)."""
    return not ("norm" in name or "bias" in name or name.startswith("diag."))


class Distiller(nn.Module):
    """Student + loss in one forward, so DDP/FSDP see every parameter use (exits included) inside it."""

    def __init__(self, student: nn.Module, loss_cfg: LossConfig):
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg

    def forward(self, input_ids, teacher_logits=None, eval_exits: bool = False):
        if eval_exits:  # held-out CE of every exit, whatever the training schedule
            cfg = dataclasses.replace(self.loss_cfg, alpha=0.0, exit_schedule="none")
            return distillation_loss(self.student, input_ids, None, cfg, all_exits=True)
        return distillation_loss(self.student, input_ids, teacher_logits, self.loss_cfg)


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic folders out/checkpoints/step-XXXXXXX with a manifest of sizes and hashes
# ------------------------------------------------------------------------------------------------


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_model_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage (tied embeddings): store each tensor once, aliases in metadata."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _load_model_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for k, src in aliases.items():
        state[k] = state[src]
    return state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders, oldest first (temp folders of interrupted saves are ignored)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the manifest is there with its size and hash; else what is wrong."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {want['size']}"
        if _hash_file(f) != want["blake2b"]:
            return f"{name} does not match its hash"
    return None


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """Newest intact checkpoint; a damaged newer one is reported with a warning and skipped."""
    for path in reversed(list_checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        _warn(f"checkpoint {path} is corrupted ({problem}); falling back to the previous one")
    return None


def save_checkpoint(out: Path, step: int, tokens: int, accelerator, model, optimizer, scheduler, keep_last: int,
                    is_fsdp: bool) -> Path:
    """Write out/checkpoints/step-XXXXXXX atomically: a temp folder, fsync'd, then one rename.

    The model goes to safetensors (the full state dict, gathered under FSDP); the optimizer is one
    file too, gathered under FSDP and keyed by parameter name (so resume may use another number of
    processes; pickling the per-rank DTensor shards ties them to the process group). RNG states are
    per rank.
    """
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # collective under FSDP
    rank = accelerator.process_index
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_state = get_optimizer_state_dict(  # collective; the full state lands on rank 0 only
            model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_state = optimizer.state_dict()
    if main:
        torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if main:
        prefix = "student."
        _save_model_state({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()},
                          tmp / "model.safetensors")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        meta = {"step": step, "tokens": tokens, "world_size": accelerator.num_processes, "fsdp": is_fsdp}
        (tmp / "meta.json").write_text(json.dumps(meta))
    accelerator.wait_for_everyone()
    if main:
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            files[f.name] = {"size": f.stat().st_size, "blake2b": _hash_file(f)}
        (tmp / "manifest.json").write_text(json.dumps({"files": files}, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
        if final.exists():  # re-saving a step after falling back from a damaged copy
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        for old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------
# Input checks (all before anything is written to out/)
# ------------------------------------------------------------------------------------------------


def _check_out_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"output directory {out} already exists; pass --resume to continue it or --overwrite to replace it")
    if cfg.overwrite and out.exists():
        student = Path(cfg.student).expanduser().resolve()
        if student == out.resolve() or out.resolve() in student.parents:
            raise TrainError(f"--overwrite would delete the student {cfg.student} inside {out}; choose another --out")


def _load(name: str, role: str, dtype=torch.float32):
    from ..hub import ModelLoadError, load_pretrained

    try:
        return load_pretrained(name, dtype=dtype)
    except ModelLoadError as e:
        raise TrainError(f"cannot load the {role}: {e}") from e


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _check_vocab(student, tok_s, teacher, tok_t, teacher_name: str) -> None:
    """The KL compares logits index by index: both models must use the same tokenizer."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise TrainError(f"teacher {teacher_name} has a vocabulary of {vt} logits but the student has {vs}; "
                         "distillation needs the same tokenizer")
    if len(tok_s) != len(tok_t):
        raise TrainError(f"teacher {teacher_name} tokenizer has {len(tok_t)} tokens but the student's has {len(tok_s)}; "
                         "distillation needs the same tokenizer")
    if tok_s.get_vocab() != tok_t.get_vocab():
        raise TrainError(f"teacher {teacher_name} tokenizer maps tokens to different ids than the student's; "
                         "distillation needs the same tokenizer")
    probe = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 1234 é 中"
    ids_s = tok_s(probe, add_special_tokens=False)["input_ids"]
    ids_t = tok_t(probe, add_special_tokens=False)["input_ids"]
    special = lambda t: (t.eos_token_id, t.bos_token_id)  # noqa: E731
    if ids_s != ids_t or special(tok_s) != special(tok_t):
        raise TrainError(f"teacher {teacher_name} tokenizes text differently from the student (same vocabulary size, "
                         "different token ids); distillation needs the same tokenizer")


def _check_exits(student, schedule: str) -> None:
    from ..modeling import RecursiveForCausalLM

    if schedule == "none":
        return
    if not isinstance(student, RecursiveForCausalLM):
        raise TrainError(f"exit_schedule={schedule!r} needs a recursive student (this one is a "
                         f"{type(student).__name__}); use exit_schedule=none")
    if not student.layout.loopable:
        raise TrainError(f"exit_schedule={schedule!r} needs loop boundaries, which strategy "
                         f"{student.layout.strategy!r} lacks; use a cycle strategy or exit_schedule=none")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one JSON object per line, flushed at once (main process only)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # Resume: drop what the interrupted run logged after the checkpoint we restart from.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


@torch.no_grad()
def evaluate(model, heldout, cfg: TrainConfig, accelerator, micro: int) -> dict:
    """Held-out CE/perplexity of every exit over the first eval_tokens, sharded over ranks."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = min(len(heldout), max(1, cfg.eval_tokens // cfg.seq_len))
    # Same sequences whatever the world size; ranks get equal numbers of forwards (FSDP needs that),
    # a rank whose share ran out evaluates sequence 0 with weight 0.
    padded = -(-n // world) * world
    mine = list(range(rank, padded, world))
    sums, count = None, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), micro):
        rows = [j for j in mine[i:i + micro] if j < n]
        ids = torch.stack([heldout[j]["input_ids"] for j in rows or [0]]).to(accelerator.device)
        out = model(ids, eval_exits=True)
        labels = len(rows) * (ids.shape[1] - 1)
        s = out["exit_ce"].float() * labels
        sums = s if sums is None else sums + s
        count += labels
    model.train(was_training)
    totals = accelerator.reduce(torch.cat([sums, torch.tensor([float(count)], device=sums.device)]), "sum")
    exit_loss = (totals[:-1] / totals[-1]).tolist()
    return {
        "loss": exit_loss[-1],
        "ppl": math.exp(min(exit_loss[-1], 700)),
        "exit_loss": exit_loss,
        "exit_ppl": [math.exp(min(x, 700)) for x in exit_loss],
        "eval_tokens": int(totals[-1].item()),
    }


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a distillation run; returns the final metrics.

    ``on_step(record)`` is called on every process after each optimizer step with that step's
    metrics record (for notebooks, tests, custom logging).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from .data import DataConfig, DataError, batches, build_datasets

    # 1. Inputs -------------------------------------------------------------------------------
    cfg.validate()
    _check_out_dir(cfg)
    out = Path(cfg.out)
    use_cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if use_cuda else "no")
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=mp)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(f"batch_size={cfg.batch_size} must be divisible by processes*grad_accum = "
                         f"{world}*{cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = cfg.total_steps
    set_seed(cfg.seed)

    student, tokenizer = _load(cfg.student, "student")
    for model, role in ((student, "student"),):
        limit = _max_positions(model)
        if limit and cfg.seq_len > limit:
            raise TrainError(f"seq_len={cfg.seq_len} is beyond the {role}'s max_position_embeddings={limit}")
    _check_exits(student, cfg.exit_schedule)
    teacher = None
    if cfg.alpha > 0:
        teacher, tok_t = _load(cfg.teacher, "teacher", TEACHER_DTYPES[cfg.teacher_dtype])
        limit = _max_positions(teacher)
        if limit and cfg.seq_len > limit:
            raise TrainError(f"seq_len={cfg.seq_len} is beyond the teacher's max_position_embeddings={limit}")
        _check_vocab(student, tokenizer, teacher, tok_t, cfg.teacher)
        teacher.requires_grad_(False).eval().to(accelerator.device)
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

    # 2. Output folder and resume (the first writes) ------------------------------------------------
    ckpt = None
    if main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if cfg.resume:
        found = [str(latest_checkpoint(out) or "") if main else ""]
        if world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)  # only the main process verifies; everyone resumes from its pick
        ckpt = Path(found[0]) if found[0] else None
        old_cfg = out / "train_config.json"
        if main and old_cfg.exists():
            before = json.loads(old_cfg.read_text())
            changed = [k for k in _RUN_IDENTITY if before.get(k) != cfg.to_dict().get(k)]
            if changed:
                _warn(f"resuming with different {', '.join(changed)} than the original run; steps will not match it")
        if ckpt is None and main:
            _warn(f"--resume: no intact checkpoint in {out / 'checkpoints'}; starting from step 0")
    if main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    start_step = 0
    if ckpt is not None:
        meta = json.loads((ckpt / "meta.json").read_text())
        start_step = meta["step"]
        if meta.get("fsdp", False) != is_fsdp:  # the optimizer file is keyed differently
            how = "with" if meta.get("fsdp") else "without"
            raise TrainError(f"checkpoint {ckpt} was written {how} FSDP; resume it {how} FSDP too")
        missing, unexpected = student.load_state_dict(_load_model_state(ckpt / "model.safetensors"), strict=False)
        if unexpected or [k for k in missing if k not in _tied_keys(student)]:
            raise TrainError(f"checkpoint {ckpt} does not fit the student (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")

    # 3. Model, optimizer, schedule ------------------------------------------------------------
    for name, p in student.named_parameters():
        p.requires_grad_(_is_trainable(name, cfg.trainable))
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"trainable={cfg.trainable!r} selects no parameter of this student")
    groups = [
        {"params": [p for n, p in params if _decays(n)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if not _decays(n)], "weight_decay": 0.0},
    ]
    student.train()
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=use_cuda or None)
    # `plan` holds the step count; with max_time it is re-fitted to the measured speed (see below).
    plan = {"total": total_steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, plan["total"]))
    loss_cfg = LossConfig(alpha=cfg.alpha, temperature=cfg.temperature, exit_schedule=cfg.exit_schedule,
                          chunk_elements=cfg.kd_chunk_elements)
    model, optimizer = accelerator.prepare(Distiller(student, loss_cfg), optimizer)
    if ckpt is not None:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu" if is_fsdp else accelerator.device,
                               weights_only=True)
        if is_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer.optimizer, opt_state,
                                     options=StateDictOptions(full_state_dict=True))  # each rank keeps its shard
        else:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng_file = ckpt / f"rng-rank{rank}.pt"
        _set_rng_state(torch.load(rng_file if rng_file.exists() else ckpt / "rng-rank0.pt", weights_only=True))
    # Taken after prepare, all of them: FSDP swaps in sharded parameters, and accelerate clips an FSDP
    # model only when handed exactly model.parameters() (frozen ones have no grad and count nothing).
    clip_params = list(model.parameters())

    # 4. Signals: finish the step, checkpoint, return ------------------------------------------------
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)

    keep_until = (start_step if ckpt is not None else -1) if cfg.resume else None
    metrics = MetricsLog(out / "metrics.jsonl", main, keep_until)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and cfg.progress), file=sys.stderr)
    log = bar.write if (main and cfg.progress) else (lambda s: None)
    result: dict = {"out": str(out), "total_steps": total_steps, "interrupted": None}
    last_eval = None
    try:
        if cfg.eval_every >= 0 and start_step == 0:
            last_eval = evaluate(model, heldout_ds, cfg, accelerator, micro)
            metrics.write({"kind": "eval", "step": 0, "tokens": 0, **last_eval})
            log(f"step 0: held-out ppl {_fmt_ppl(last_eval)}")

        # 5. The loop ---------------------------------------------------------------------------
        data = iter(())
        if start_step < plan["total"]:
            data = batches(train_ds, cfg.batch_size, cfg.seed, start_step=start_step, rank=rank, world_size=world)
        step, t_start, run_tokens, eval_s = start_step, time.perf_counter(), 0, 0.0
        while step < plan["total"]:
            t0 = time.perf_counter()
            batch = next(data)["input_ids"].to(accelerator.device)
            stats = torch.zeros(3, device=accelerator.device)  # loss, ce, kd
            for i, ids in enumerate(batch.split(micro)):
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():  # bf16 on GPU, a no-op on CPU
                        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                last = i == cfg.grad_accum - 1
                with accelerator.no_sync(model) if not last else nullcontext():
                    out_ = model(ids, teacher_logits)
                    accelerator.backward(out_["loss"] / cfg.grad_accum)
                stats += torch.stack([out_["loss"].detach(), out_["ce"], out_["kd"]]).float() / cfg.grad_accum
                del teacher_logits, out_
            grad_norm = accelerator.clip_grad_norm_(clip_params, cfg.clip if cfg.clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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
            if cfg.max_time > 0 and (step - start_step) % 3 == 0:
                fitted = fit_steps_to_time(step, cfg.max_time - (time.perf_counter() - t_start),
                                           (time.perf_counter() - t_start) / (step - start_step), total_steps)
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
                last_eval = evaluate(model, heldout_ds, cfg, accelerator, micro)
                eval_s += time.perf_counter() - t_eval
                metrics.write({"kind": "eval", "step": step, "tokens": step * tokens_per_step, **last_eval})
                log(f"step {step}: held-out ppl {_fmt_ppl(last_eval)}")

            signum = stop["signal"] or 0
            if world > 1:  # every rank must stop at the same step
                signum = int(accelerator.reduce(torch.tensor([signum], device=accelerator.device), "sum").item())
            periodic = cfg.save_every > 0 and step % cfg.save_every == 0
            if periodic or (step == plan["total"] and cfg.save_every >= 0) or signum:
                path = save_checkpoint(out, step, step * tokens_per_step, accelerator, model, optimizer, scheduler,
                                       cfg.keep_last, is_fsdp)
                log(f"saved {path}")
            if signum:
                sig_name = signal.Signals(stop["signal"] or signal.SIGTERM).name
                result["interrupted"] = sig_name
                result["exit_code"] = 128 + int(stop["signal"] or signal.SIGTERM)
                log(f"{sig_name}: checkpoint at step {step} written; resume with --resume")
                break

        # 6. Final model --------------------------------------------------------------------------
        result.update(step=step, tokens=step * tokens_per_step, total_steps=plan["total"])
        if step > start_step:
            result.update(loss=loss, ce=ce, kd=kd, tokens_per_s=run_tokens / train_s)
        if last_eval:
            result.update(eval_loss=last_eval["loss"], eval_ppl=last_eval["ppl"], exit_ppl=last_eval["exit_ppl"])
        if result["interrupted"] is None:
            state = accelerator.get_state_dict(model)
            if main:
                prefix = "student."
                state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
                accelerator.unwrap_model(model).student.save_pretrained(out, state_dict=state)
                tokenizer.save_pretrained(out)
                (out / "final_metrics.json").write_text(json.dumps(result, indent=1))
                try:
                    from .plot import plot_metrics

                    plot_metrics(out)
                except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
                    _warn(f"could not plot metrics: {e}")
            accelerator.wait_for_everyone()
    finally:
        bar.close()
        metrics.close()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return result


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
    return keys if getattr(model.config, "tie_word_embeddings", False) else set()


def _fmt_ppl(ev: dict) -> str:
    if len(ev["exit_ppl"]) > 1:
        return " / ".join(f"{p:.2f}" for p in ev["exit_ppl"]) + " (per loop)"
    return f"{ev['ppl']:.2f}"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from TrainConfig's fields and their help text (one source of truth)."""
    parser = argparse.ArgumentParser(
        prog="python -m recursify.train.trainer",
        description="Uptrain a recursive student by knowledge distillation from its teacher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw = {"help": f.metadata.get("help", ""), "default": default, "dest": f.name}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind.startswith("list"):
            parser.add_argument(flag, nargs="+", **kw)
        else:
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=typ, required=f.name == "student", **kw)
    return parser


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
