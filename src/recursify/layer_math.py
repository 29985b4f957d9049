"""The weight-free math of a decoder layer: norms, the RoPE rotation, causal masks and attention.

Pure functions of tensors and the source architecture's numbers (`families.Arch`), so the
recursive model, the serving engine and sequential calibration all compute them the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:
    """LayerNorm, RMSNorm, or Gemma's RMSNorm (gain 1 + w); w/b may be per row (already gathered)."""
    if kind == "layernorm":
        if w.dim() == 1:
            return F.layer_norm(x, (x.shape[-1],), w, b, eps)
        return F.layer_norm(x, (x.shape[-1],), None, None, eps) * w + b
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms_gemma":
        return (xf * (1.0 + w.float())).type_as(x)
    return w * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] channels of each head (partial rotary leaves the rest)."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot[..., : d // 2], x_rot[..., d // 2 :]
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


def causal_masks(attention_mask, batch: int, seq: int, past, device, sliding_window: int | None,
                 total: int | None = None) -> dict[bool, torch.Tensor]:
    """Boolean masks [batch, 1, seq, total] for full (False) and sliding (True) layers.

    `past` is the cache index of the first query: an int, or a LongTensor[batch] when rows start
    at different indices (the serving engine); `total` keys (default past + seq). Causality is on
    cache indices, as in Hugging Face; a fully padded query row may attend to itself so that
    padding never produces NaNs that would leak through the cache.
    """
    t = torch.arange(seq, device=device)
    if isinstance(past, int):
        total = past + seq if total is None else total
        q_idx = (past + t).view(1, 1, seq, 1)
    else:
        q_idx = (past.view(batch, 1) + t.view(1, seq)).view(batch, 1, seq, 1)
    k_idx = torch.arange(total, device=device).view(1, 1, 1, total)
    mask = k_idx <= q_idx
    if attention_mask is not None:
        mask = mask & attention_mask[:, -total:].bool().view(batch, 1, 1, total)
    mask = mask | (k_idx == q_idx)
    mask = mask.expand(batch, 1, seq, total)
    sliding = mask
    if sliding_window:
        sliding = mask & ((q_idx - k_idx) < sliding_window)
    return {False: mask, True: sliding}


def scaled_attention(q, k, v, mask, arch) -> torch.Tensor:
    """Scaled dot-product attention, soft-capping where the family has it.

    For GQA the G query heads sharing a kv head are folded into the query length
    ([n, H_kv, G*T, D]) instead of copying every key G times: decoding against a long cache
    reads each key once.
    """
    a = arch
    if a.attn_softcap:
        if a.num_kv_heads != a.num_heads:
            k = k.repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)
            v = v.repeat_interleave(a.num_heads // a.num_kv_heads, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) * a.scaling
        w = torch.tanh(w / a.attn_softcap) * a.attn_softcap
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)
    if a.num_kv_heads == a.num_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scaling)
    n, H, T, D = q.shape
    G = H // a.num_kv_heads
    qg = q.reshape(n, a.num_kv_heads, G * T, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(1, 1, G, 1), scale=a.scaling)
    return out.view(n, H, T, D)
