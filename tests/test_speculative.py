"""Self-speculative decoding is lossless: token for token the model's own full-depth greedy
`generate`, with drafts both accepted and rejected along the way."""

from __future__ import annotations

import pytest
import torch

import recursify as rf
from recursify.engine.speculative import SelfSpeculativeDecoder
from tiny_models import make


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _prompts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def _reference(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(
    "family,strategy,loops,k",
    [("llama", "cycle", 2, 3), ("llama", "cycle", 3, 4), ("gemma3", "middle_cycle", 2, 2), ("qwen3", "cycle", 2, 1)],
)
def test_output_is_full_depth_greedy_token_for_token(family, strategy, loops, k):
    model = rf.convert(make(family), rf.RecursionConfig(num_loops=loops, strategy=strategy, lora_rank=4), progress=False)
    decoder = SelfSpeculativeDecoder(model, k=k)
    drafted = accepted = 0
    for p in _prompts([3, 7, 11]):  # gemma3's sliding window is 4: longer prompts cross it
        ref = _reference(model, p, 14)
        out, stats = decoder.generate(p, 14)
        assert out == ref
        assert stats.emitted == 14 and sum(stats.per_round) + 1 >= 14
        assert stats.accepted <= stats.drafted
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    # Both branches ran: some drafts accepted, some replaced by the full depth's token.
    assert 0 < accepted < drafted


def test_k_zero_is_plain_full_depth_decoding():
    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    p = _prompts([6])[0]
    out, stats = SelfSpeculativeDecoder(model, k=0).generate(p, 9)
    assert out == _reference(model, p, 9) and stats.drafted == 0


def test_needs_a_loop_to_draft_from():
    one = rf.convert(make("llama"), rf.RecursionConfig(num_loops=1), progress=False)
    with pytest.raises(ValueError, match="at least 2 loops"):
        SelfSpeculativeDecoder(one)
    two = rf.convert(make("llama"), rf.RecursionConfig(num_loops=2), progress=False)
    with pytest.raises(ValueError, match="non-negative integer"):
        SelfSpeculativeDecoder(two, k=-1)
