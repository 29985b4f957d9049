"""Local distillation: every unrolled position learns to reproduce its own teacher layer.

Global KD scores the student only through the logits, many layers downstream of most of its
weights, and pays for the teacher's and the student's full forwards through the vocabulary-wide
head. Here each position p gets its own target: given the teacher's hidden state h_p, the student's
layer at p (shared weights + LoRA_p + norms_p) should produce the teacher's h_{p+1}. All positions
train in one backward, so each shared weight hears from all the positions it serves at once, and
no head runs. The loss of a position is its error relative to the teacher layer's own update,
||f_p(h_p) - h_{p+1}||^2 / ||h_{p+1} - h_p||^2, so that the late layers' large residual stream does
not drown the early ones. It is the gradient-based sequel of the closed-form calibrated init: it
sees the nonlinearities (attention, gating, norms) that the closed forms treat as fixed.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..config import RecursionConfig
from ..conversion.sequential import layer_fn


def _trainable(model) -> list[torch.nn.Parameter]:
    """Everything a decoder layer uses; the embedding, final norm and head get no local signal."""
    skip = ("embed_tokens", "lm_head", "final_norm")
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(skip)]


@torch.no_grad()
def teacher_states(teacher, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0 (embeddings) ... h_L (before the final norm) of a one-loop conversion of the source."""
    h = teacher.embed(ids)
    run = layer_fn(teacher, h)
    states = [h]
    for p in range(teacher.layout.num_layers):
        h = run(p, p, h)
        states.append(h)
    return states


def local_loss(student, states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over positions of each layer's output error relative to the teacher layer's update."""
    run = layer_fn(student, states[0])
    losses = []
    for p, slot in enumerate(student.layout.slot_of_position):
        target, inp = states[p + 1], states[p]
        err = (run(slot, p, inp) - target).pow(2).mean()
        losses.append(err / (target - inp).pow(2).mean().clamp(min=1e-12))
    return torch.stack(losses).mean()


def local_distill(student, source, sequences: torch.Tensor, lr: float = 3e-4, batch_size: int = 4,
                  max_time: float | None = None, max_steps: int | None = None, warmup: int = 5,
                  progress: bool = True) -> dict:
    """Train `student` in place on `sequences` [n, T] (cycled) until `max_time` seconds or
    `max_steps`; the learning rate decays linearly to a tenth by whichever comes first.
    Returns {"steps", "tokens", "seconds", "first_loss", "last_loss"}."""
    import recursify as rf

    if max_time is None and max_steps is None:
        raise ValueError("local_distill needs max_time or max_steps")
    device = student.embed_tokens.weight.device
    teacher = rf.convert(source, RecursionConfig(num_loops=1), progress=False).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = _trainable(student)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student.train()
    t0, step, tokens, losses = time.perf_counter(), 0, 0, []
    bar = tqdm(desc="local distillation", unit="step", disable=not progress, leave=False)
    n = len(sequences)
    while True:
        elapsed = time.perf_counter() - t0
        done = max(elapsed / max_time if max_time else 0.0, step / max_steps if max_steps else 0.0)
        if done >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (1 - 0.9 * done)
        idx = [(step * batch_size + i) % n for i in range(batch_size)]
        ids = sequences[idx].to(device)
        loss = local_loss(student, teacher_states(teacher, ids))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"local distillation loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    student.eval()
    del teacher
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
