"""Token selection on the model's device, per request.

The runner samples every emitted row of a step here and hands the scheduler token ids, never
logits (as vLLM's sampler returns `ModelRunnerOutput.sampled_token_ids`): greedy rows are one
batched argmax, the others draw from their own `torch.Generator` on the device (seeded when the
request gives `seed`), so a seeded request yields the same text whatever else shares its batch.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


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


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """Next token per row of logits [n, V], on logits' device: LongTensor [n]. `generators[i]` is
    row i's generator (None for greedy rows). Nothing here reads a device value back."""
    tokens = logits.argmax(dim=-1)
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.is_greedy:
            continue
        probs = torch.softmax(filter_logits(logits[i], p.temperature, p.top_k, p.top_p), dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens
