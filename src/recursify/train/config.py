"""What a training run depends on: `TrainConfig`, its value checks, and the command line built
from its fields, so a new option is one field with its help text and nothing else.

Saved as ``out/train_config.json``; a resume compares the fields in `RUN_IDENTITY` with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field


from ..util import DEVICE_HELP
from ..util.memory import KD_CHUNK_ELEMENTS
from .losses import EXIT_SCHEDULES

SCHEDULES = ("cosine", "wsd")
TRAINABLE = ("all", "body", "lora", "shared", "norms")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# Fields that change the data order or the LR at a given step: a resume with other values is not
# the same run any more, so we warn.
RUN_IDENTITY = ("data", "heldout", "max_tokens", "seq_len", "batch_size", "seed", "lr", "schedule",
                "warmup_steps", "min_lr", "alpha", "temperature", "exit_schedule", "trainable", "shared_lr_scale",
                "hidden_weight")


class TrainError(ValueError):
    """Bad training input; the message is one line meant for the user."""


def warn(msg: str) -> None:
    """A problem that does not stop the run: a Python warning for callers, a stderr line for logs."""
    warnings.warn(msg, stacklevel=2)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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
                                             "training (needs alpha=0). Not loaded when alpha=0 and hidden_weight=0.")
    data: list[str] = _f(["corpus/python-docs/train"], "Training text: files/folders (.txt .md .rst .jsonl or a "
                                                       "datasets folder); several are mixed in proportion to their sizes.")
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
    hidden_weight: float = _f(0.0, "Weight of hidden-state distillation: every unrolled position of a recursive "
                                   "student also learns the teacher's residual stream after the layer it stands for "
                                   "(error relative to the teacher's norm, per token). 0: logits only.")
    post_train_exits: bool = _f(False, "Continue an uptrained model to train its early exits: forces exit_schedule "
                                       "to self_kd unless it is aggressive or self_kd.")
    trainable: str = _f("all", "What to train: all, body (all but the token embedding and LM head: the "
                               "student keeps the teacher's vocabulary space, and a step skips the embedding's "
                               "gradient and update), lora (LoRA and residual diagonals only), shared (slots.* "
                               "only), norms (norms, biases, LoRA, diagonals).")
    shared_lr_scale: float = _f(1.0, "LR of the shared weights (slots.*) as a fraction of lr: each one takes the "
                                      "gradients of every position tied to it, so it may want a smaller step than "
                                      "the LoRA, norms and embeddings.")
    device: str = _f("auto", DEVICE_HELP)
    dtype: str = _f("auto", "Compute dtype of the student (autocast; its weights and optimizer stay float32): auto "
                            "(bfloat16 on a GPU that supports it, float32 on CPU), float32, bfloat16, float16.")
    teacher_dtype: str = _f("auto", "Teacher weights dtype: auto (the compute dtype: bfloat16 on GPUs, float32 on "
                                    "CPU), float32, bfloat16 (halves its memory), float16.")
    gradient_checkpointing: bool = _f(False, "Recompute each unrolled position's activations in the backward "
                                             "instead of keeping them: less memory for about one more forward.")
    reuse_freed_memory: bool = _f(True, "Keep freed CPU memory in the process between steps (glibc): faster steps "
                                        "(no page faults on each step's buffers) at the cost of a higher resident "
                                        "peak. Off: every freed buffer goes back to the kernel at once, so the peak is what is alive; "
                                        "compress turns it off unless --reuse-freed-memory.")
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
    eval_pauses_clock: bool = _f(False, "Count only the training steps against max_time, not the held-out "
                                        "evaluations: recipes whose evaluation is slower then still get equal "
                                        "training time (benchmarks); off, max_time is wall clock from the call "
                                        "to the saved model, loading and the final checkpoint included (compress).")
    kd_chunk_elements: int = _f(KD_CHUNK_ELEMENTS, "Logit elements (rows x vocab) per loss chunk: lower it to save memory.")

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
        need(self.hidden_weight >= 0, f"hidden_weight must be >= 0, got {self.hidden_weight}")
        need(self.hidden_weight == 0 or self.teacher is not None,
             f"hidden_weight={self.hidden_weight} needs a teacher; pass --teacher or --hidden-weight 0")
        need(0 < self.shared_lr_scale <= 10, f"shared_lr_scale must be in (0, 10], got {self.shared_lr_scale}")
        need(self.trainable in TRAINABLE, f"unknown trainable {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        need(self.dtype in DTYPE_CHOICES, f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        need(self.teacher_dtype in DTYPE_CHOICES,
             f"unknown teacher_dtype {self.teacher_dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
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


# The schedule: the LR is a pure function of the step (what makes resume exact); under max_time the
# step count is refitted to the measured speed.


def fit_steps_to_time(step: int, seconds_left: float, seconds_per_step: float, max_steps: int,
                      save_every: int = 0, save_s: float = 0.0) -> int:
    """The step count that ends a time-budgeted run by its deadline: `step` itself (stop now) once
    no further step fits, at most `max_steps`. `seconds_per_step` holds the evaluation time too
    unless it pauses the clock; a checkpoint every `save_every` steps costs `save_s` where it falls."""

    def cost(more: int) -> float:
        saves = (step + more) // save_every - step // save_every if save_every > 0 else 0
        return more * seconds_per_step + saves * save_s

    lo, hi = 0, max(0, max_steps - step)  # the most further steps that fit: cost() grows with them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid - 1)
    return step + lo


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
