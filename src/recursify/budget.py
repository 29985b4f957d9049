"""The memory budget `recursify compress` checks before any work: each stage's estimated peak
against what the device has free, and what to give up (or which flag to pass) when it does not fit.
The time budget is planned in `compress/plan.py`."""

from __future__ import annotations


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
                     embedding_params=sum(embeddings.values()),
                     lora=bool(recursion.lora_rank or any((recursion.rank_pattern or {}).values())))


HEADROOM = 0.85  # plan for this share of the free memory: the estimates are good to about 15 %


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
        return estimate(shapes, batch=batch, seq_len=seq_len, calib_tokens=calib_tokens, curvature=curvature,
                        teacher_bytes=dtype.itemsize, compute_bytes=dtype.itemsize, checkpointing=on,
                        frozen_embeddings=frozen)

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
