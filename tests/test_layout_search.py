"""Choosing the loops for a parameter budget: the candidates fill it, the search keeps the best."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make

import recursify as rf
from recursify.conversion.calibrate import collect_stats
from recursify.eval.metrics import perplexity
from recursify.conversion.layout_search import candidates, capped, full_ranks, search, without_search

GEN = torch.Generator().manual_seed(0)


def built_params(source, recursion) -> int:
    """Parameters of the model actually converted, counted from its tensors."""
    return sum(p.numel() for p in rf.convert(source, recursion, progress=False).parameters())


def test_each_candidate_has_the_largest_rank_that_fits():
    source = make("llama")
    total = sum(p.numel() for p in source.parameters())
    # k and v project 64 -> 2 heads x 16: their full rank is 32; the other linears' is 64.
    assert full_ranks(source, rf.RecursionConfig()) == {"q": 64, "k": 32, "v": 32, "o": 64, "gate": 64, "up": 64,
                                                        "down": 64}
    for target in (0.6, 0.95):
        found = candidates(source, target, init="average")
        assert [c.loops for c in found] == [2, 3, 6]  # the divisors of 6 layers
        for c in found:
            assert c.params == built_params(source, c.recursion) <= target * total
            ranks = c.recursion.rank_pattern or {n: c.recursion.lora_rank for n in ("q", "k", "v", "o", "gate", "up", "down")}
            rank = max(ranks.values())
            assert all(r == min(rank, 32 if n in "kv" else 64) for n, r in ranks.items())  # capped at full rank
            if rank < 64:  # one more rank would not fit
                bigger = capped(rf.RecursionConfig(num_loops=c.loops, init="average"), rank + 1, full_ranks(source, c.recursion))
                assert built_params(source, bigger) > target * total
        ranks = [c.recursion.lora_rank for c in found]
        assert ranks == sorted(ranks) and ranks[0] < ranks[-1]  # fewer shared layers buy more rank
    full = full_ranks(source, rf.RecursionConfig())
    assert capped(rf.RecursionConfig(), 20, full).lora_rank == 20  # no linear at its full rank yet
    assert capped(rf.RecursionConfig(), 40, full).rank_pattern == {**{n: 40 for n in full}, "k": 32, "v": 32}
    with pytest.raises(ValueError, match="below the smallest recursive model"):
        candidates(source, 0.05)


def test_the_search_keeps_the_layout_the_source_really_has():
    """A source whose layers repeat A B C A B C is exactly a 2-loop cycle model at rank 0: the
    search must find it among the layouts of the same size, and it reproduces the source."""
    source = make("llama")
    layers = source.model.layers
    with torch.no_grad():
        for i in range(3):
            for p, q in zip(layers[i + 3].parameters(), layers[i].parameters()):
                p.copy_(q)
        source.lm_head.weight.mul_(8)  # peaked predictions, so that layouts differ clearly
    total = sum(p.numel() for p in source.parameters())
    two_loops = rf.RecursionConfig(num_loops=2, init="average", lora_rank=0)
    target = built_params(source, two_loops) / total
    # Text the source itself samples: no other model scores it better in expectation (Gibbs).
    torch.manual_seed(0)
    start = torch.randint(0, 97, (32, 1), generator=GEN)
    tokens = source.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=31, min_new_tokens=31,
                             do_sample=True, top_k=0, pad_token_id=1)
    stats = collect_stats(source, tokens, progress=False)
    options = candidates(source, target, init="average")
    assert [(c.loops, c.recursion.lora_rank) for c in options][0] == (2, 0)
    best = search(source, stats, tokens, options, seq_len=32, log=lambda s: None)
    assert best.loops == 2
    teacher = perplexity(source, tokens, context_len=32, stride=32)["ppl"]
    assert best.ppl == pytest.approx(teacher, rel=1e-5)
    assert all(c.ppl > teacher * 1.001 for c in options if c.loops != 2)


def test_without_a_search_the_most_loops_that_share_three_layers():
    source = make("llama")
    found = candidates(source, 0.8, init="average")  # 6 layers: 2, 3 or 6 loops of 3, 2 or 1
    assert without_search(source, found).loops == 2
    assert without_search(source, found[1:]).loops == 3  # none shares 3 layers: the fewest loops
