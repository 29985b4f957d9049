"""Peak-memory estimates of compress's stages, from the models' shapes alone.

Each stage's peak is the sum of what is alive at its busiest moment, in bytes. The terms, and
what each stands for:

* teacher: its parameters at the dtype it is held in (float32 while calibrating and converting:
  the maths' dtype; the teacher dtype while distilling);
* statistics: one [L, d_in, d_in] float32 covariance per distinct linear input (calibration), and
  one [L, d_out, d_out] per linear with the output curvature;
* conversion: the student in float32 plus the largest linear's stacked weights and delta, and one
  chunk of positions' float64 decomposition temporaries (`calibrate.position_chunks`);
* distillation: the student's float32 weights (4 bytes a parameter) and, for the parameters it
  trains, their gradients and AdamW's two moments (12 more; frozen embeddings save them: the fused
  head loss keeps the head's gradient one buffer, `train.head_loss`), the activations every
  unrolled position keeps for the backward (with gradient checkpointing only its input), the
  norms beyond a pre-norm layer's two (Gemma's sandwich and q/k norms), the dense W + B A of each
  linear whose LoRA is merged for the step (`lora.merge_pays`), the attention scores of one
  position, and one sequence chunk's logit temporaries: the teacher's logits are made chunk by
  chunk from its final hidden state (`losses.TeacherLogits`);
* evaluation: both models at the compute dtype plus one batch's logits for each and the agreement's
  copies of their unpadded rows, capped at `LOGIT_ELEMENTS` (`eval.metrics` shrinks its batches).

`benchmarks/scale.py` records these estimates beside the measured peaks (RSS on CPU,
`torch.cuda.max_memory_allocated` on a GPU), which `PhasePeaks` samples. The process itself
(Python, torch, tokenizers) is `BASE` bytes on top.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field

GiB = 2**30
BASE = int(1.0 * GiB)  # interpreter, torch, tokenizer, allocator slack
KD_CHUNK_ELEMENTS = 1 << 24  # logit elements (rows x vocab) of one KD loss chunk (train.losses' default)
CHUNK_BYTES = 4 * KD_CHUNK_ELEMENTS  # ... in fp32 (64 MiB) ...
CHUNK_LIVE = 5  # ... of which about five are alive at once (student and teacher logits, both log-softmaxes, KL)
LOGIT_ELEMENTS = 1 << 26  # [batch, seq, vocab] elements an evaluation forward may make (eval.metrics)
ROW_ELEMENTS = 1 << 24  # ... and its softmax temporaries' row chunk
NORM_KEEPS = 3  # tensors of its width a norm keeps for the backward (input, normalised, scaled)
CONVERT_CHUNK = 1 << 29  # calibrate.position_chunks' budget for a chunk's float64 temporaries


@dataclass(frozen=True)
class Shapes:
    """What the estimates need of a teacher/student pair."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # num_kv_heads * head_dim
    vocab: int
    teacher_params: int
    student_params: int
    input_dims: tuple[int, ...]  # d_in of each distinct linear input (q/k/v share one, gate/up another)
    output_dims: tuple[int, ...]  # d_out of each linear (the curvature's sizes)
    largest_linear: tuple[int, int]  # (d_out, d_in) of the biggest linear
    embedding_params: int = 0  # input embedding plus an untied output head (what trainable "body" freezes)
    linears: tuple[tuple[int, int], ...] = ()  # (d_in, d_out) of each linear of a layer
    extra_norm_width: int = 0  # summed widths of a layer's norms beyond the two of a pre-norm layer
    lora: bool = True  # the student has adapters (merged into W + B A when that pays)


@dataclass
class MemoryPlan:
    stages: dict[str, int] = field(default_factory=dict)  # stage -> estimated peak bytes (BASE included)
    checkpointing: bool = False
    curvature: bool = True
    frozen_embeddings: bool = False  # distillation trains the body only (trainable "body")

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)


def activation_bytes(s: Shapes, tokens: int, seq_len: int, batch: int, compute_bytes: int, checkpointing: bool) -> int:
    """What the backward keeps of the unrolled positions' forward."""
    per_token = (10 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate + NORM_KEEPS * s.extra_norm_width) * compute_bytes
    scores = batch * s.heads * seq_len * seq_len * compute_bytes * 2  # softmax input and output of one position
    # tokens * (d_in + d_out) > d_in * d_out: the step multiplies by W + B A, which its backward keeps
    merged = sum(i * o for i, o in s.linears if tokens * (i + o) > i * o) * compute_bytes if s.lora else 0
    one_position = tokens * per_token + scores + merged
    if checkpointing:
        return s.layers * tokens * s.hidden * compute_bytes + one_position
    return s.layers * one_position


def estimate(s: Shapes, *, batch: int, seq_len: int, calib_tokens: int, curvature: bool, teacher_bytes: int = 4,
             compute_bytes: int = 4, checkpointing: bool = False, eval_batch: int = 8,
             frozen_embeddings: bool = False) -> MemoryPlan:
    """Estimated peak bytes of each of compress's stages (see the module docstring)."""
    tokens = batch * seq_len
    teacher32 = 4 * s.teacher_params
    stats = 4 * s.layers * sum(d * d for d in s.input_dims)
    curv = 4 * s.layers * sum(d * d for d in s.output_dims) if curvature else 0
    calib_act = min(calib_tokens, 4 * seq_len) * (s.hidden * 6 + s.intermediate * 2) * 4
    if curvature:  # backward passes of the teacher, one sequence at a time, and that sequence's logits
        calib_act += activation_bytes(s, seq_len, seq_len, 1, 4, False) + 4 * seq_len * s.vocab * 4
    d_out, d_in = s.largest_linear
    convert_tmp = s.layers * d_out * d_in * 4 * 2 + CONVERT_CHUNK  # W and delta (fp32), one chunk's fp64 fit
    logits = CHUNK_LIVE * min(CHUNK_BYTES, tokens * s.vocab * 4)
    trained = s.student_params - (s.embedding_params if frozen_embeddings else 0)
    eval_logits = min(eval_batch * seq_len * s.vocab, LOGIT_ELEMENTS) * 4
    plan = MemoryPlan(checkpointing=checkpointing, curvature=curvature, frozen_embeddings=frozen_embeddings)
    plan.stages = {
        "calibrate": BASE + teacher32 + stats + curv + calib_act,
        "convert": BASE + teacher32 + stats + curv + 4 * s.student_params + convert_tmp,
        "distil": BASE + teacher_bytes * s.teacher_params + 4 * s.student_params + 12 * trained + logits
                  + activation_bytes(s, tokens, seq_len, batch, compute_bytes, checkpointing),
        # both models' logits, and the agreement's copies of their unpadded rows, plus softmax row chunks
        "evaluate": BASE + compute_bytes * (s.teacher_params + s.student_params) + 4 * eval_logits + 4 * ROW_ELEMENTS * 4,
    }
    return plan


def shapes_of(arch, family, teacher_params: int, student_params: int, embedding_params: int = 0,
              lora: bool = True) -> Shapes:
    """Shapes from a recursify `Arch` and `Family` and the two parameter counts."""
    linears = {name: arch.linear_shape(name) for name in family.linears}  # name -> (d_in, d_out)
    inputs = {"attention": arch.hidden_size, "o": linears["o"][0], "mlp": arch.hidden_size, "down": linears["down"][0]}
    biggest = max(linears.values(), key=lambda io: io[0] * io[1])
    qk = (arch.num_heads + arch.num_kv_heads) * arch.head_dim if arch.qk_norm else 0
    wide = len(set(family.norms) - {"q_norm", "k_norm"})  # norms of the residual stream's width
    return Shapes(layers=arch.num_layers, hidden=arch.hidden_size, intermediate=arch.intermediate_size,
                  heads=arch.num_heads, kv_dim=arch.num_kv_heads * arch.head_dim, vocab=arch.vocab_size,
                  teacher_params=teacher_params, student_params=student_params,
                  input_dims=tuple(inputs.values()), output_dims=tuple(d_out for _, d_out in linears.values()),
                  largest_linear=(biggest[1], biggest[0]), embedding_params=embedding_params,
                  linears=tuple(linears.values()), extra_norm_width=(wide - 2) * arch.hidden_size + qk,
                  lora=lora)


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def rss_bytes() -> int:
    """The process's resident memory now (its peak so far where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhasePeaks:
    """Measured peak memory and seconds of each phase of a run.

    A thread reads the process's resident memory (on a CUDA device, the allocator's peak) every
    `interval` seconds and keeps each phase's maximum. `switch(name)` starts a phase; `during(name, fn)`
    wraps `fn` so that its calls count as phase `name` and then give back the phase they interrupted::

        peaks = PhasePeaks(interval=0.02)
        torch.optim.AdamW.step = peaks.during("AdamW step", torch.optim.AdamW.step)
        ...
        peaks.close()  # peaks.peaks: phase -> bytes, peaks.seconds: phase -> seconds
    """

    def __init__(self, device=None, interval: float = 0.2, phase: str = "start"):
        self.cuda = getattr(device, "type", device) == "cuda"
        self.interval = interval
        self.phase, self._t = phase, time.monotonic()
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        return rss_bytes()

    def _record(self) -> None:
        phase, value = self.phase, self._now()
        self.peaks[phase] = max(self.peaks.get(phase, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval)

    def switch(self, name: str) -> None:
        self._record()  # the phase that ends keeps what it reached since the last sample
        now = time.monotonic()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self._t
        self.phase, self._t = name, now
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def during(self, name: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            outer = self.phase
            self.switch(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(outer)

        return wrapped

    def close(self, name: str = "done") -> None:
        self.switch(name)
        self._stop.set()
        self._thread.join()
