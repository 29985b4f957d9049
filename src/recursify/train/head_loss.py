"""CE and KD of a linear LM head, fused: the logits are made one sequence chunk at a time and the
head's weight gradient accumulates in place into one buffer.

With a large vocabulary the head's weight gradient is the biggest tensor of a step after the
weights (Gemma 3: 262,144 x 640, 0.6 GiB in float32). Differentiating chunk by chunk through
autograd makes a fresh [V, d] gradient per chunk and adds it to the running sum, so two are alive
at once; and when the head is tied to the input embeddings, the embedding's dense gradient is a
third. Here, as in Liger-Kernel's fused linear cross-entropy, the backward recomputes each chunk's
logits and adds its share with `addmm_` into one buffer; a recursive student with tied embeddings
also looks its tokens up with a sparse gradient (`RecursiveForCausalLM`), which autograd adds into
that buffer in place. One [V, d] gradient is alive, as the memory plan counts it.

For one chunk, with z the logits, T the temperature, p_T = softmax(z / T) and q_T the teacher's::

    CE = sum over labelled rows of -log softmax(z)[label]      dCE/dz = softmax(z) - onehot(label)
    KD = T^2 * sum over rows of KL(q_T || p_T)                  dKD/dz = T * (p_T - q_T)

and a final soft-cap z = c * tanh(u / c) multiplies by dz/du = 1 - (z / c)^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearHead", "fused_head_sums"]


@dataclass
class LinearHead:
    """A model's readout: logits = cap * tanh(norm(h) @ weight.T / cap) (no cap when `cap` is None)."""

    norm: nn.Module
    weight: torch.Tensor
    cap: float | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.norm(h), self.weight)
        return torch.tanh(z / self.cap) * self.cap if self.cap else z


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _FusedHeadSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, target_logits, chunk, temperature, cap, dtype):
        ctx.save_for_backward(x, weight, labels)
        ctx.args = (target_logits, chunk, temperature, cap, dtype)
        w = weight.to(dtype)
        ce_total = x.new_zeros((), dtype=torch.float32)
        kd_total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[1], chunk):
            sl = slice(start, start + chunk)
            z = _logits(x[:, sl], w, cap)
            lab = labels[:, sl].flatten()
            ce_total += F.cross_entropy(z.flatten(0, -2), lab, ignore_index=-100, reduction="sum")
            t = target_logits(sl)
            if t is not None:
                T = temperature
                log_s = F.log_softmax(z if T == 1 else z / T, dim=-1)
                log_t = F.log_softmax(t.float() if T == 1 else t.float() / T, dim=-1)
                kd_total += F.kl_div(log_s, log_t, log_target=True, reduction="sum") * (T * T)
        return ce_total, kd_total

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        x, weight, labels = ctx.saved_tensors
        target_logits, chunk, T, cap, dtype = ctx.args
        w = weight.to(dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, x.shape[1], chunk):
            sl = slice(start, start + chunk)
            xc = x[:, sl].to(dtype)
            z = _logits(xc, w, cap)
            lab = labels[:, sl].unsqueeze(-1)
            labelled = (lab != -100).to(z.dtype)
            t = target_logits(sl)
            # dCE/dz = softmax(z) - onehot(label) on labelled rows; dKD/dz = T * (softmax(z / T) - softmax(t / T)),
            # whose softmax(z) at T = 1 is the CE's: one softmax of z serves both
            shared = t is not None and T == 1
            gz = torch.softmax(z, dim=-1).mul_(labelled * g_ce + (g_kd if shared else 0))
            gz.scatter_add_(-1, lab.clamp(min=0), labelled * -g_ce)
            if shared:
                gz.sub_(torch.softmax(t.float(), dim=-1).mul_(g_kd))
            elif t is not None:
                gz.add_(torch.softmax(z / T, dim=-1).sub_(torch.softmax(t.float() / T, dim=-1)).mul_(g_kd * T))
            if cap:
                gz.mul_(1 - (z / cap).square())
            del z
            gz = gz.to(dtype).flatten(0, -2)
            if grad_x is not None:
                grad_x[:, sl] = (gz @ w).view(*xc.shape[:-1], -1).to(x.dtype)
            if grad_w is not None:
                flat = xc.flatten(0, -2)
                if grad_w.dtype == dtype:
                    grad_w.addmm_(gz.T, flat)
                else:  # a float32 weight under autocast: accumulate its gradient in float32
                    grad_w.addmm_(gz.T.to(grad_w.dtype), flat.to(grad_w.dtype))
        return grad_x, grad_w, None, None, None, None, None, None


def _logits(x: torch.Tensor, w: torch.Tensor, cap: float | None) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        z = (x.to(w.dtype) @ w.T).float()
    return torch.tanh(z / cap) * cap if cap else z


def fused_head_sums(head: LinearHead, h: torch.Tensor, labels: torch.Tensor,
                    target_logits: Callable[[slice], torch.Tensor | None], chunk: int,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, T^2-scaled KD sum) of `head` over the hidden states h [B, S, d], `chunk` positions at a
    time. `target_logits(positions)` gives the teacher's logits of those positions (None: CE only)."""
    x = head.norm(h)
    return _FusedHeadSums.apply(x, head.weight, labels, target_logits, chunk, temperature, head.cap,
                                _compute_dtype(x))
