"""Token selection from logits, per request.

Each request samples with its own torch.Generator (seeded when `seed` is given), so a seeded
request yields the same text whatever else shares its batch.
"""

from __future__ import annotations

import torch

from .request import Request


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits [V] with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, req: Request) -> int:
    """The next token for `req` from its logits [V]."""
    p = req.params
    if p.is_greedy:
        return int(logits.argmax())
    if req.generator is None:
        req.generator = torch.Generator()
        if p.seed is not None:
            req.generator.manual_seed(p.seed)
        else:
            req.generator.seed()
    probs = torch.softmax(filter_logits(logits, p.temperature, p.top_k, p.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=req.generator))
