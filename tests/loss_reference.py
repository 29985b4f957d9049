"""Losses on ready-made logits, for checking `distillation_loss` against: only the tests need them.

`kd_loss` goes through the library's chunked KL (`_exit_sums`), so the tests that call it check
the chunking and its recomputation in the backward too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recursify.train.losses import DEFAULT_CHUNK_ELEMENTS, _exit_sums


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over every [batch, seq] position."""
    labels = torch.full(student_logits.shape[:-1], -100, dtype=torch.long, device=student_logits.device)
    _, kd = _exit_sums(lambda x: x, student_logits, labels, teacher_logits, False, temperature, chunk_elements,
                       student_logits.shape[-1])
    return kd / labels.numel()


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the same as the model's own ``labels=input_ids`` loss."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, -2), input_ids[:, 1:].flatten())


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
