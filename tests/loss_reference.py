"""Losses on ready-made logits, written from their definitions, to check `distillation_loss` against.

Nothing here comes from recursify: the KL is computed by hand from ``log_softmax`` over the whole
[batch, seq, vocab] tensor at once (no chunking, no checkpointing), so a test that compares the
library's loss to these compares two independent computations.

The conventions are those `recursify.train.losses` documents and `distillation_loss` applies:

* KD = T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position, averaged over *every*
  [batch, seq] position (the teacher has a distribution at the last position too, which has no
  next-token label);
* CE = next-token cross-entropy, averaged over the positions that have a target (labels are
  ``input_ids`` shifted left; the last position's is -100 and ignored): the model's own
  ``labels=input_ids`` loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over every [batch, seq] position."""
    T = float(temperature)
    log_s = F.log_softmax(student_logits.double() / T, dim=-1)
    log_t = F.log_softmax(teacher_logits.double() / T, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)
    return (per_position.mean() * (T * T)).to(student_logits.dtype)


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the same as the model's own ``labels=input_ids`` loss: position t
    predicts token t + 1, the last position has no target."""
    log_p = F.log_softmax(logits[:, :-1].double(), dim=-1)
    target = input_ids[:, 1:]
    nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.mean().to(logits.dtype)


def kd_ce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * CE on ready-made logits (alpha=0: CE only; alpha=1: KD only)."""
    ce = ce_loss(student_logits, input_ids)
    if teacher_logits is None or alpha == 0:
        return ce
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return kd if alpha == 1 else alpha * kd + (1 - alpha) * ce
