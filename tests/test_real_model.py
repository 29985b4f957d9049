"""The same invariants on the real bundled SmolLM2-135M (about a minute in all)."""

from __future__ import annotations

import pytest
import torch

import recursify as rf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        return rf.load_pretrained("smollm2-135m")
    except rf.ModelLoadError as e:
        pytest.skip(str(e))


def test_full_rank_reproduces_smollm2_logits_and_greedy_text(smollm2):
    teacher, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    model = rf.convert(teacher, rf.RecursionConfig(num_loops=2, init="average", lora_rank="full"), progress=False)
    with torch.no_grad():
        ref = teacher(ids).logits
        assert (model(ids).logits - ref).abs().max().item() < 1e-4
        a = teacher.generate(ids, max_new_tokens=32, do_sample=False)
        b = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(b[0])


def test_rank_zero_smollm2_counts(smollm2):
    teacher, _ = smollm2
    model = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=0), progress=False)
    counts = model.parameter_breakdown()
    layer_linears = sum(p.numel() for n, p in teacher.model.layers.named_parameters() if n.endswith("proj.weight"))
    assert counts["shared"] == layer_linears // 2
    assert counts["embedding"] == 49152 * 576
    # 30 positions x 2 norms x 576, plus the final norm (the head is tied to the embedding).
    assert counts["other"] == 30 * 2 * 576 + 576
