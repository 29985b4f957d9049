"""The time budget `recursify compress` plans against: a clock that survives a resume, and what a
conversion costs in teacher forwards (the planner turns forwards into seconds with the forward
speed it measures on the machine)."""

from __future__ import annotations

import time


def convert_forwards(init: str, scale: float = 1.0) -> float:
    """A conversion's time in teacher forwards (measured on SmolLM2 / 2 cores): about 10k whatever
    the tokens, four times that with the joint calibrated shared-weight fit; times `scale`
    (`conversion_scale`) for another model."""
    return (40_000 if init == "calibrated" else 10_000) * scale


def _decomposition_per_forward(arch, family) -> float:
    """A conversion's decompositions (an eigendecomposition of min(d_in, d_out) per linear and
    position: cubic) per multiply-add of one token's forward (quadratic)."""
    shapes = [arch.linear_shape(n) for n in family.linears]
    cubic = arch.num_layers * sum(min(d_in, d_out) ** 3 for d_in, d_out in shapes)
    macs = arch.num_layers * sum(d_in * d_out for d_in, d_out in shapes) + arch.hidden_size * arch.vocab_size
    return cubic / macs


# SmolLM2-135M's ratio (30 layers of 576 / 1536, vocabulary 49152), which `convert_forwards` was measured on
_SMOLLM2_RATIO = 30 * (5 * 576**3 + 2 * 192**3) / (30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152)


def conversion_scale(arch, family) -> float:
    """How many times SmolLM2's conversion time, in its own forwards, a model's conversion takes:
    eigendecompositions grow with the cube of the width, a forward with its square (a 1B model
    of TinyLlama's shape: about 4x)."""
    return _decomposition_per_forward(arch, family) / _SMOLLM2_RATIO


def curvature_forwards(tokens: int, sequential: bool) -> int:
    """The output curvature's time in teacher forwards (measured the same way): about 4 a token for
    the backward passes, then one G^{1/2} per linear and position in the conversion and again in
    the sequential refit."""
    return 4 * tokens + 20_000 + (20_000 if sequential else 0)


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


def compress_shapes(source_config, recursion, target_params: float | None = None):
    """The shapes the memory estimates need, from the source's config alone (the teacher built on
    the meta device, the student counted by `allocate.parameter_count`: nothing is allocated).
    With `target_params` the student's size is that fraction of the teacher's."""
    import torch
    from transformers import AutoModelForCausalLM

    from .conversion.allocate import parameter_count
    from .families import arch_from_config, detect_family
    from .util.memory import shapes_of

    family = detect_family(source_config)
    with torch.device("meta"):
        source = AutoModelForCausalLM.from_config(source_config)
    teacher_params = sum(p.numel() for p in source.parameters())
    student_params = (int(target_params * teacher_params) if target_params is not None
                      else parameter_count(source, recursion))
    embeddings = {id(m.weight): m.weight.numel() for m in (source.get_input_embeddings(), source.get_output_embeddings())
                  if m is not None}  # tied: one tensor
    return shapes_of(arch_from_config(family, source_config), family, teacher_params, student_params,
                     embedding_params=sum(embeddings.values()))


def memory_plan(source_config, recursion, *, batch: int, seq_len: int, calib_tokens: int, curvature: bool,
                placement, teacher_dtype, target_params: float | None = None, checkpointing: str = "off"):
    """(MemoryPlan, free bytes on the device) of a compress run as asked: checkpointing "on" or
    "off" (`fit_memory` decides "auto")."""
    from .util.device import free_memory
    from .util.memory import estimate

    shapes = compress_shapes(source_config, recursion, target_params)
    return estimate(shapes, batch=batch, seq_len=seq_len, calib_tokens=calib_tokens, curvature=curvature,
                    teacher_bytes=teacher_dtype.itemsize, compute_bytes=placement.dtype.itemsize,
                    checkpointing=checkpointing == "on"), free_memory(placement.device)


HEADROOM = 0.85  # plan for this share of the free memory: the estimates are good to about 15 %
# Distillation keeps freed CPU memory for the next step (`cpu_heap.keep_freed_memory`) only when its
# estimated peak times this still fits: the retained heap added up to about a fifth on a 1B model.
REUSE_MARGIN = 1.25


def fit_memory(source_config, recursion, *, batch: int, seq_len: int, calib_tokens: int, curvature: bool, placement,
               target_params: float | None, checkpointing: str, trainable: str = "all"):
    """Fit the run to the device's memory: (plan, usable bytes, changes made, hint). Gradient
    checkpointing (when "auto"), then the output curvature, then training the embeddings (their
    gradients and AdamW moments: 12 bytes a parameter) are given up in turn, as the time planner
    gives up work for a short budget; `changes` names them. `hint` is None when the plan fits, else
    the first option (a command-line flag) that would make it fit."""
    import torch

    from .util.device import free_memory
    from .util.memory import estimate

    shapes = compress_shapes(source_config, recursion, target_params)
    free = int(free_memory(placement.device) * HEADROOM)

    def plan(batch=batch, curvature=curvature, on=checkpointing == "on", dtype=placement.dtype,
             frozen=trainable == "body"):
        memory = estimate(shapes, batch=batch, seq_len=seq_len, calib_tokens=calib_tokens, curvature=curvature,
                          teacher_bytes=dtype.itemsize, compute_bytes=dtype.itemsize, checkpointing=on,
                          frozen_embeddings=frozen)
        memory.reuse_freed_memory = memory.stages["distil"] * REUSE_MARGIN <= free
        return memory

    memory, changes = plan(), []
    auto = checkpointing == "auto"
    if memory.peak > free and auto:
        memory = plan(on=True)
        changes.append("gradient checkpointing on")
    if memory.peak > free and curvature:
        memory = plan(curvature=False, on=memory.checkpointing)
        changes.append("no output curvature")
    if memory.peak > free and trainable == "all" and shapes.embedding_params:
        memory = plan(curvature=memory.curvature, on=memory.checkpointing, frozen=True)
        changes.append("embeddings frozen during distillation")
    if memory.peak <= free:
        return memory, free, changes, None
    on = checkpointing != "off"
    fixes = [(f"--batch-size {max(1, batch // 2)}", dict(batch=max(1, batch // 2), curvature=False, on=on, frozen=True))]
    if not on:
        fixes.insert(0, ("--gradient-checkpointing on", dict(on=True, curvature=False, frozen=True)))
    if placement.device.type == "cuda" and placement.dtype == torch.float32:
        fixes.insert(0, ("--dtype bfloat16", dict(dtype=torch.bfloat16, curvature=False, on=on, frozen=True)))
    hint = next((flag for flag, kw in fixes if plan(**kw).peak <= free), "a machine with more memory")
    return memory, free, changes, hint
