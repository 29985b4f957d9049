"""Losses for uptraining a recursive student: LM cross-entropy, forward KL to a teacher, early exits.

Per exit (the residual stream at the end of a loop, read out by ``model.exit_logits``)::

    loss_exit = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

and the training objective is ``sum_i w_i * loss_exit_i + hidden_weight * loss_hidden`` with the
weights of the exit schedule:

* ``none``: only the last exit (the full model), w = [0, ..., 0, 1];
* ``weighted``: exit i (1-based) gets i / sum_j j, so deeper exits count more;
* ``aggressive``: 0.1 on every intermediate exit, 1.0 on the last (the Relaxed Recursive
  Transformers recipe: the final model barely notices the extra exits);
* ``self_kd``: aggressive weights, but the intermediate exits distil (KL at temperature T) towards
  the *detached* final exit instead of the teacher/labels, so they learn to imitate the full model
  without pulling it towards their shallower predictions.

``loss_hidden`` (hidden-state distillation, a recursive student only) gives every unrolled position
its own target: unrolled position p stands for the teacher's layer p, so the student's residual
stream after p should be the teacher's after layer p. Per token it is the squared error relative to
the teacher's squared norm, averaged over tokens and over positions 0 .. L-2 (the last position is
what the logits already distil). KD alone reaches position p only through the layers above it.

Memory: a [batch, seq, vocab] fp32 tensor is the largest thing in a KD step (49152-token vocab,
8 x 256 tokens: 400 MB each, and log-softmax/KL keep several). Logits are therefore made from the
hidden states one sequence chunk at a time and, when more than one chunk is needed, each chunk is
activation-checkpointed, so only one chunk's [b, c, V] intermediates are alive at once, in the
forward and in the backward. The final [B, T, V] logits of the model are never materialised for a
recursive student (``logits_to_keep=1``), nor the teacher's: the trainer hands over the teacher's
final hidden state and head as :class:`TeacherLogits`, whose logits are made inside each chunk (and
made again in that chunk's backward, one head matmul, instead of being held from forward to backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..util.memory import KD_CHUNK_ELEMENTS
from .head_loss import LinearHead, fused_head_sums

__all__ = [
    "EXIT_SCHEDULES",
    "LossConfig",
    "TeacherLogits",
    "distillation_loss",
    "exit_weights",
    "hidden_state_loss",
    "next_token_labels",
]

EXIT_SCHEDULES = ("none", "weighted", "aggressive", "self_kd")

# Logit elements ([rows, vocab]) computed at once; 2^24 fp32 = 64 MiB per live temporary. A chunk is
# recomputed in the backward (one head matmul), so smaller chunks cost a little time, not memory.
DEFAULT_CHUNK_ELEMENTS = KD_CHUNK_ELEMENTS


@dataclass
class LossConfig:
    """How a training step turns student (and teacher) outputs into one scalar."""

    alpha: float = 1.0  # weight of KD; 1 - alpha goes to CE on the labels
    temperature: float = 1.0
    exit_schedule: str = "none"
    hidden_weight: float = 0.0  # weight of hidden-state distillation (needs the teacher's hidden states)
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.exit_schedule not in EXIT_SCHEDULES:
            raise ValueError(f"unknown exit schedule {self.exit_schedule!r}; choose one of {', '.join(EXIT_SCHEDULES)}")


class TeacherLogits:
    """A teacher's logits, made one sequence chunk at a time from its final hidden state.

    ``head`` maps hidden states [..., d] to logits [..., V] (`teacher_head`). Indexing along the
    sequence (``t[:, a:b]``) slices the hidden state and computes nothing; ``logits()`` makes them.
    """

    def __init__(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab: int):
        self.hidden, self.head, self.vocab = hidden, head, vocab

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.vocab)

    def __getitem__(self, index) -> "TeacherLogits":
        return TeacherLogits(self.hidden[index], self.head, self.vocab)

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.hidden)


def teacher_head(model) -> tuple[Callable[..., object], Callable[[torch.Tensor], torch.Tensor]] | None:
    """(decoder, head) of a Hugging Face causal LM, with ``head(decoder(ids).last_hidden_state)`` its
    logits (Gemma 2's final soft-cap included); None for a model that does not split so."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if decoder is None or out is None or decoder is model:
        return None
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not cap:
        return decoder, out

    def capped(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(out(h) / cap) * cap

    return decoder, capped


def exit_weights(schedule: str, num_exits: int) -> list[float]:
    """Weight of each exit (loop 1 .. num_exits) in the objective."""
    if schedule not in EXIT_SCHEDULES:
        raise ValueError(f"unknown exit schedule {schedule!r}; choose one of {', '.join(EXIT_SCHEDULES)}")
    n = num_exits
    if schedule == "none" or n == 1:
        return [0.0] * (n - 1) + [1.0]
    if schedule == "weighted":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    return [0.1] * (n - 1) + [1.0]  # aggressive and self_kd


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = input_ids[:, t + 1]; the last position has no target (-100)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _chunk_terms(
    head: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor | None,
    target_is_hidden: bool,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of CE and of T^2-scaled KL over one chunk of positions.

    ``target`` is teacher logits, or (``target_is_hidden``) the student's final hidden state, whose
    logits are recomputed here without gradient: cheaper than keeping them around.
    """
    z = head(h).float()
    ce = F.cross_entropy(z.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")
    if target is None:
        return ce, z.new_zeros(())
    if target_is_hidden:
        with torch.no_grad():
            target = head(target)
    elif isinstance(target, TeacherLogits):
        target = target.logits()
    T = temperature
    log_s = F.log_softmax(z / T if T != 1 else z, dim=-1)
    t = target.float()
    log_t = F.log_softmax(t / T if T != 1 else t, dim=-1)
    kd = F.kl_div(log_s, log_t, log_target=True, reduction="sum") * (T * T)
    return ce, kd


def _exit_sums(
    head: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor | None,
    target_is_hidden: bool,
    temperature: float,
    chunk_elements: int,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KD sum) over all positions, computed over sequence chunks."""
    bsz, seq = h.shape[:2]
    chunk = max(1, min(seq, chunk_elements // max(1, bsz * vocab)))
    recompute = torch.is_grad_enabled() and h.requires_grad
    if recompute and isinstance(head, LinearHead):  # the head's weight gradient in one buffer (head_loss)

        def target_logits(sl: slice) -> torch.Tensor | None:
            if target is None:
                return None
            if target_is_hidden:
                with torch.no_grad():
                    return head(target[:, sl])
            return target[:, sl].logits() if isinstance(target, TeacherLogits) else target[:, sl]

        return fused_head_sums(head, h, labels, target_logits, chunk, temperature)
    if chunk >= seq:
        return _chunk_terms(head, h, labels, target, target_is_hidden, temperature)
    ce_total = kd_total = None
    for start in range(0, seq, chunk):
        sl = slice(start, start + chunk)
        args = (head, h[:, sl], labels[:, sl], None if target is None else target[:, sl], target_is_hidden, temperature)
        if recompute:
            ce, kd = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_terms(*args)
        ce_total = ce if ce_total is None else ce_total + ce
        kd_total = kd if kd_total is None else kd_total + kd
    return ce_total, kd_total


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hidden_state_loss(student_states, teacher_states) -> torch.Tensor:
    """Mean over positions p < L-1 and tokens of |h_s,p - h_t,p|^2 / |h_t,p|^2.

    ``student_states[p]`` is the residual stream after unrolled position p, ``teacher_states`` the
    Hugging Face ``hidden_states`` tuple (embeddings first, so layer p's output is index p + 1; the
    last entry is after the final norm and is not used).
    """
    terms = []
    for p in range(len(student_states) - 1):
        s, t = student_states[p].float(), teacher_states[p + 1].float()
        terms.append(((s - t).square().sum(-1) / t.square().sum(-1).clamp(min=1e-6)).mean())
    return torch.stack(terms).mean()


def _student_exits(model, input_ids: torch.Tensor, all_exits: bool, positions: bool = False):
    """(head, hidden states to read out, number of exits, per-position states or None): loop ends
    for a loopable recursive model, else logits."""
    from ..modeling import RecursiveForCausalLM

    if isinstance(model, RecursiveForCausalLM) and (model.layout.loopable or positions):
        # logits_to_keep=1: the full [B, T, V] logits are made chunk by chunk below instead.
        loops = model.layout.loopable
        out = model(input_ids, use_cache=False, output_loop_states=loops, output_position_states=positions,
                    logits_to_keep=1)
        states = list(out.loop_hidden_states) if loops else [out.position_hidden_states[-1]]
        head = model.exit_logits
        if model.lm_head.bias is None:  # the same readout, which the fused head loss differentiates
            head = LinearHead(model.final_norm, model.lm_head.weight, model.arch.final_softcap)
        return (head, (states if all_exits else states[-1:]), len(states), out.position_hidden_states)
    if positions:
        raise ValueError("hidden-state distillation needs a recursive student, whose positions map onto the "
                         "teacher's layers")
    out = model(input_ids, use_cache=False)
    return _identity, [out.logits], 1, None


def distillation_loss(
    model,
    input_ids: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    cfg: LossConfig,
    all_exits: bool = False,
    teacher_hidden: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the student and return {"loss", "ce", "kd", "hidden", "exit_ce", "exit_kd"}.

    ``loss`` is the objective to back-propagate; ``ce``/``kd`` are the final exit's mean CE and KD
    (KD is 0 without a teacher), ``exit_ce``/``exit_kd`` tensors [num_exits] of every exit's values
    (only the exits the schedule uses, unless ``all_exits``; the others are NaN). With
    ``teacher_logits=None`` the KD term is dropped (evaluation, or CE-only training).
    """
    schedule = cfg.exit_schedule
    need_exits = all_exits or schedule != "none"
    use_hidden = cfg.hidden_weight > 0 and teacher_hidden is not None
    head, states, num_exits, positions = _student_exits(model, input_ids, need_exits, use_hidden)
    weights = exit_weights(schedule, num_exits)
    first = num_exits - len(states)  # index of states[0] among all exits
    labels = next_token_labels(input_ids)
    num_labels = (labels != -100).sum().clamp(min=1)
    num_positions = labels.numel()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or teacher_logits.shape[-1]
    final_h = states[-1]

    nan = torch.full((num_exits,), float("nan"), device=input_ids.device)
    exit_ce, exit_kd = nan.clone(), nan.clone()
    total = None
    for j, h in enumerate(states):
        i = first + j
        last = i == num_exits - 1
        if not last and schedule == "self_kd":
            target, hidden, a = final_h.detach(), True, 1.0
        else:
            target, hidden, a = teacher_logits, False, cfg.alpha
        if target is not None and a == 0:
            target = None  # CE only: skip the KL work entirely
        ce_sum, kd_sum = _exit_sums(head, h, labels, target, hidden, cfg.temperature, cfg.chunk_elements, vocab)
        ce, kd = ce_sum / num_labels, kd_sum / num_positions
        exit_ce[i], exit_kd[i] = ce.detach(), kd.detach()
        if target is None:
            term = ce
        elif a == 1:
            term = kd
        else:
            term = a * kd + (1 - a) * ce
        w = weights[i]
        if w:
            total = w * term if total is None else total + w * term
    hidden = torch.zeros((), device=input_ids.device)
    if use_hidden:
        hidden = hidden_state_loss(positions, teacher_hidden)
        total = total + cfg.hidden_weight * hidden
    return {
        "loss": total,
        "hidden": hidden.detach(),
        "ce": exit_ce[-1],
        "kd": exit_kd[-1] if teacher_logits is not None and cfg.alpha > 0 else torch.zeros((), device=input_ids.device),
        "exit_ce": exit_ce,
        "exit_kd": exit_kd,
    }
