"""What `train()` checks before it writes anything: the output folder, each model's context, and
whether the student can take the losses asked for. Each failure is one TrainError line."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig, TrainError


def check_out_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"output directory {out} already exists; pass --resume to continue it or --overwrite to replace it")
    if cfg.overwrite and out.exists():
        student = Path(cfg.student).expanduser().resolve()
        if student == out.resolve() or out.resolve() in student.parents:
            raise TrainError(f"--overwrite would delete the student {cfg.student} inside {out}; choose another --out")


def load(cfg: TrainConfig, name: str, role: str, dtype=torch.float32):
    """Load a model and refuse one whose context is shorter than seq_len."""
    from ..hub import ModelLoadError, load_pretrained

    try:
        model, tokenizer = load_pretrained(name, dtype=dtype)
    except ModelLoadError as e:
        raise TrainError(f"cannot load the {role}: {e}") from e
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        raise TrainError(f"seq_len={cfg.seq_len} is beyond the {role}'s max_position_embeddings={limit}")
    return model, tokenizer


def check_student(student, teacher, cfg: TrainConfig) -> None:
    """Exit losses need loop boundaries; hidden-state targets need one position per teacher layer."""
    from ..modeling import RecursiveForCausalLM

    recursive = isinstance(student, RecursiveForCausalLM)
    for name, value, off in (("exit_schedule", cfg.exit_schedule, "none"), ("hidden_weight", cfg.hidden_weight, 0)):
        if value != off and not recursive:
            raise TrainError(f"{name}={value!r} needs a recursive student (this one is a {type(student).__name__}); "
                             f"use {name}={off}")
    if cfg.exit_schedule != "none" and not student.layout.loopable:
        raise TrainError(f"exit_schedule={cfg.exit_schedule!r} needs loop boundaries, which strategy "
                         f"{student.layout.strategy!r} lacks; use a cycle strategy or exit_schedule=none")
    layers = teacher.config.get_text_config().num_hidden_layers if cfg.hidden_weight else None
    if cfg.hidden_weight and student.layout.num_layers != layers:
        raise TrainError(f"hidden_weight={cfg.hidden_weight}: the student unrolls {student.layout.num_layers} "
                         f"positions but the teacher has {layers} layers; distil from the model it was converted from")
