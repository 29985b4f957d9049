"""What `recursify compress` is asked to do: `CompressConfig` and its checks, the one-line
`CompressError`, the time budget's own format (`parse_duration`, `fmt_seconds`) and the constants
the planner and the executor share."""

from __future__ import annotations

from dataclasses import dataclass, field

SEARCH_TOKENS = 2048  # training tokens each --loops auto candidate is scored on
DEFAULT_TARGET = 0.75  # the student's size with --loops auto and no --target-params
MIN_CALIB_TOKENS = 2048  # a short budget halves the calibration text down to this, no further
FIT_TOKENS = 8192  # calibration tokens the sequential refit and the output curvature use at most


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
    reuse_freed_memory: bool = False  # CPU: distil keeping freed buffers (faster steps, a higher resident peak)
    max_compute: float | None = None  # --loops auto: layouts' multiply-adds per token, as a fraction of the teacher's

    @property
    def search_init(self) -> str:
        """The init layouts are compared with: the joint calibrated fit costs four plain conversions'
        time, so the search uses the average init and only the chosen layout gets `init`."""
        return "average" if self.init == "calibrated" else self.init

    def validate(self) -> None:
        if self.time_budget <= 0:
            raise CompressError(f"--time-budget must be positive, got {self.time_budget}")
        from ..train.losses import EXIT_SCHEDULES

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


def parse_duration(text: str) -> float:
    """'90s', '45m', '1.5h' or plain seconds -> seconds (a ValueError naming the forms otherwise)."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"cannot read the duration {text!r}; use e.g. 90s, 45m, 1.5h") from None


def fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["DEFAULT_TARGET", "FIT_TOKENS", "MIN_CALIB_TOKENS", "SEARCH_TOKENS", "CompressConfig", "CompressError",
           "fmt_seconds", "parse_duration"]
