"""Conversion exactness and structure, checked against the Hugging Face implementations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, make
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

import recursify as rf
from recursify.config import Layout
from recursify.conversion.convert import source_layer_for_slot
from recursify.lora import truncated_svd

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["cycle", "sequence", "middle_cycle"])
def test_full_rank_svd_reproduces_the_source_logits(family, strategy):
    source = make(family)
    ref = source(IDS).logits
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, strategy=strategy, init="average", lora_rank="full"), progress=False)
    assert (model(IDS).logits - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_residual_variant_full_rank_is_exact(family):
    source = make(family)
    model = rf.convert(source, rf.RecursionConfig(num_loops=3, variant="residual", lora_rank="full"), progress=False)
    assert model.recursion.strategy == "sequence"
    assert (model(IDS).logits - source(IDS).logits).abs().max().item() < 1e-4


def test_one_loop_is_the_source_model():
    source = make("qwen3")
    model = rf.convert(source, rf.RecursionConfig(num_loops=1), progress=False)
    assert (model(IDS).logits - source(IDS).logits).abs().max().item() < 1e-5


def test_rank_zero_is_not_the_source_model():
    """Guards the exactness test against a comparison that would pass trivially."""
    source = make("llama")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank=0), progress=False)
    assert (model(IDS).logits - source(IDS).logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_rank_zero_stores_each_shared_weight_once(family, tmp_path):
    source = make(family)
    L = source.config.num_hidden_layers
    model = rf.convert(source, rf.RecursionConfig(num_loops=3, lora_rank=0), progress=False)
    K = model.layout.num_slots
    assert K == L // 3
    fam = rf.families.detect_family(source.config)
    layers = source.get_submodule(fam.layers)
    linear_params = sum(
        p.numel() for n, p in layers.named_parameters() if n.endswith("weight") and p.dim() == 2
    )
    small = sum(p.numel() for p in layers.parameters()) - linear_params  # norms and biases, per position
    counts = model.parameter_breakdown()
    assert counts["shared"] * L == linear_params * K
    assert counts["lora"] == 0
    assert counts["embedding"] == source.get_input_embeddings().weight.numel()
    head = 0 if source.config.tie_word_embeddings else source.get_output_embeddings().weight.numel()
    final = sum(p.numel() for p in source.get_submodule(fam.final_norm).parameters())
    assert counts["other"] == small + head + final

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert sum(t.numel() for k, t in tensors.items() if k.startswith("slots.")) == counts["shared"]
    # Weight bytes on disk match the unique parameters (fp32), not the unrolled depth.
    assert (tmp_path / "model.safetensors").stat().st_size < 4 * counts["total"] * 1.01 + 100_000


def test_layouts_map_positions_to_slots():
    L = 6
    assert Layout.build(L, rf.RecursionConfig(num_loops=2, strategy="cycle")).slot_of_position == (0, 1, 2, 0, 1, 2)
    assert Layout.build(L, rf.RecursionConfig(num_loops=2, strategy="sequence")).slot_of_position == (0, 0, 1, 1, 2, 2)
    assert Layout.build(L, rf.RecursionConfig(num_loops=2, strategy="middle_cycle")).slot_of_position == (0, 1, 2, 1, 2, 3)
    assert Layout.build(L, rf.RecursionConfig(num_loops=2, strategy="middle_sequence")).slot_of_position == (0, 1, 1, 2, 2, 3)
    with pytest.raises(rf.ConfigError, match="valid values: 1, 2, 3, 6"):
        Layout.build(L, rf.RecursionConfig(num_loops=4))


def test_stepwise_keeps_first_and_last_layer():
    layout = Layout.build(30, rf.RecursionConfig(num_loops=2))
    assert source_layer_for_slot(layout, "stepwise") == [round(x) for x in torch.linspace(0, 29, 15).tolist()]
    assert source_layer_for_slot(layout, "stepwise")[0] == 0 and source_layer_for_slot(layout, "stepwise")[-1] == 29
    assert source_layer_for_slot(layout, "lower") == list(range(15))


def test_average_init_is_the_mean_of_tied_layers():
    source = make("llama")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, strategy="cycle", init="average"), progress=False)
    q = [layer.self_attn.q_proj.weight for layer in source.model.layers]
    torch.testing.assert_close(model.slots[1].linears["q"].weight, (q[1] + q[4]) / 2)
    # Norms stay per position by default; with share_norms they are averaged per slot too.
    torch.testing.assert_close(model.norm_weight["attn_norm"][4], source.model.layers[4].input_layernorm.weight)
    shared = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", share_norms=True), progress=False)
    torch.testing.assert_close(
        shared.norm_weight["attn_norm"][1],
        (source.model.layers[1].input_layernorm.weight + source.model.layers[4].input_layernorm.weight) / 2,
    )


def test_truncated_svd_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 40, 24), (3, 24, 40)]:
        delta = torch.randn(*shape, generator=g)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        B, A = truncated_svd(delta, 5)
        torch.testing.assert_close((B @ A).double(), (U[..., :5] * S[..., None, :5]) @ Vh[..., :5, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.transpose(1, 2), torch.eye(5).expand(3, 5, 5), atol=1e-5, rtol=0)
        torch.testing.assert_close(B.norm(dim=1).double(), S[:, :5], atol=1e-4, rtol=0)
        B, A = truncated_svd(delta, min(shape[1:]))
        torch.testing.assert_close(B @ A, delta, atol=1e-5, rtol=0)


def test_svd_lora_factors_match_the_layer_difference():
    source = make("llama")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, init="stepwise", lora_rank=4), progress=False)
    p = 4  # position 4 uses slot 1 under cycle with K = 3
    delta = source.model.layers[p].mlp.down_proj.weight - model.slots[1].linears["down"].weight
    U, S, Vh = torch.linalg.svd(delta.double())
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    lora = model.lora["down"]
    torch.testing.assert_close((lora.lora_B[p] @ lora.lora_A[p]).double(), best, atol=1e-5, rtol=0)


def test_zero_lora_init_starts_as_the_plain_recursive_model():
    source = make("llama")
    plain = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=0), progress=False)
    zero = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=8, lora_init="zero"), progress=False)
    torch.testing.assert_close(zero(IDS).logits, plain(IDS).logits)


def test_rows_at_different_depths_get_what_they_get_alone():
    source = make("gemma3")
    model = rf.convert(source, rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)
    depth = torch.tensor([1, 3])
    batched = model(IDS, depth=depth).logits
    for i, d in enumerate(depth.tolist()):
        alone = model(IDS[i : i + 1], depth=torch.tensor([d])).logits
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)
    # depth = num_loops is the ordinary forward; an early exit is the loop state through the head.
    out = model(IDS, output_loop_states=True)
    torch.testing.assert_close(model(IDS, depth=torch.tensor([3, 3])).logits, out.logits)
    torch.testing.assert_close(batched[0], model.exit_logits(out.loop_hidden_states[0])[0], atol=1e-5, rtol=0)


def test_per_row_positions_in_one_layer_call_match_separate_calls():
    """The serving engine batches rows at different loops through one shared slot."""
    source = make("gemma3")
    model = rf.convert(source, rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)
    h = model.embed(IDS)
    pos_ids = torch.arange(IDS.shape[1]).expand(2, -1)
    rope = model.rope(h, pos_ids)
    masks = model.build_masks(None, 2, IDS.shape[1], 0, h.device)

    def attend(q, k, v, position, is_sliding):
        if isinstance(is_sliding, bool):
            return model.attention_scores(q, k, v, masks[is_sliding][: q.shape[0]])
        mask = torch.where(is_sliding.view(-1, 1, 1, 1), masks[True], masks[False])
        return model.attention_scores(q, k, v, mask)

    slot = 1
    positions = torch.tensor(model.layout.positions_of_slot(slot)[::2])  # same slot, loops 0 and 2
    # One sliding-window and one full-attention position: rope bases and masks differ per row.
    assert [model.sliding[p] for p in positions.tolist()] == [True, False]
    batched = model.layer_forward(slot, positions, h, rope, attend)
    for i, p in enumerate(positions.tolist()):
        alone = model.layer_forward(slot, p, h[i : i + 1], {k: (c[i : i + 1], s[i : i + 1]) for k, (c, s) in rope.items()}, attend)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "positions",
    [[3, 0, 3, 4, 0, 3, 1], [2, 2, 2, 2, 2, 2, 2], [6, 5, 4, 3, 2, 1, 0], [0, 0, 0, 1, 1, 1, 1]],
    ids=["mixed", "one_position", "all_distinct", "sorted"],
)
def test_per_row_lora_matches_a_row_loop_with_int_index_gradients(positions):
    """Rows at a few depths are served one matmul pair per distinct depth; that must be what one
    int-indexed adapter per row gives, gradients of the stacked weights included."""
    from recursify.lora import DepthwiseLoRA

    g = torch.Generator().manual_seed(0)
    P, d_in, d_out, r = 7, 10, 6, 3
    lora = DepthwiseLoRA(P, d_in, d_out, r)
    with torch.no_grad():
        lora.lora_A.copy_(torch.randn(P, r, d_in, generator=g))
        lora.lora_B.copy_(torch.randn(P, d_out, r, generator=g))
    A = lora.lora_A.detach().clone().requires_grad_()
    B = lora.lora_B.detach().clone().requires_grad_()
    pos = torch.tensor(positions)
    x = torch.randn(len(positions), 4, d_in, generator=g)
    cotangent = torch.randn(len(positions), 4, d_out, generator=g)

    y = lora(x, pos)
    ref = torch.stack([x[i] @ A[p].T @ B[p].T for i, p in enumerate(positions)])
    torch.testing.assert_close(y, ref)
    (y * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    torch.testing.assert_close(lora.lora_A.grad, A.grad)
    torch.testing.assert_close(lora.lora_B.grad, B.grad)


def test_per_forward_adapter_views_give_the_int_index_gradients(monkeypatch):
    """forward() splits the stacked LoRA weights once (adapter_views) instead of int-indexing them
    per use; logits and gradients must be those of plain int indexing, and no view may outlive it."""
    import contextlib

    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(IDS, labels=IDS, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("lora.")}

    logits, grads = run()
    assert all(m._views is None for m in model.lora.values())
    with monkeypatch.context() as m:  # the reference: every use indexes the stacked Parameter
        m.setattr(type(model), "adapter_views", lambda self: contextlib.nullcontext())
        ref_logits, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)


def test_merged_adapter_gives_the_adapter_path_logits_and_gradients(monkeypatch):
    """Many tokens at one position use the dense W + B A (`DepthwiseLoRA.merge_pays`); logits and
    the gradients of W, A and B must be those of applying the adapter beside W."""
    from recursify.lora import DepthwiseLoRA

    torch.manual_seed(0)
    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)
    with torch.no_grad():  # B A not small against W, so a wrong merge would show
        for lora in model.lora.values():
            lora.lora_B.normal_(std=0.2)
    ids = torch.randint(0, 97, (4, 64))
    calls = []

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    real = DepthwiseLoRA.merge_pays
    monkeypatch.setattr(DepthwiseLoRA, "merge_pays", lambda self, x: calls.append(real(self, x)) or calls[-1])
    logits, grads = run()
    assert calls and all(calls), "256 tokens at one position should take the merged weight"
    monkeypatch.setattr(DepthwiseLoRA, "merge_pays", lambda self, x: False)
    ref_logits, ref_grads = run()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and any(n.startswith("slots.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    x = torch.zeros(1, 2, model.lora["q"].lora_A.shape[-1])
    assert not real(model.lora["q"], x), "a decode step of 2 tokens should keep the adapter"


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_full_rank_greedy_generate_equals_the_source(family):
    source = make(family)
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank="full"), progress=False)
    prompt = IDS[:1, :5]
    a = source.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_generate_equals_step_by_step_forward_with_left_padding():
    source = make("mistral")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=8), progress=False)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, n_pad in ((0, 2), (1, 0)):
        seq = ids[row : row + 1, n_pad:]
        for _ in range(6):  # no cache: full recomputation each step
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(seq[0, -6:], gen[row, -6:])


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_decode_with_either_cache_name_equals_forward_without_cache(name):
    """transformers passes the KV cache as `past_key_values` (<= 5.23) or `cache` (>= 5.24): the
    model must read both, and return it where the installed `generate()` looks for it."""
    from transformers.cache_utils import DynamicCache

    from recursify.modeling import CACHE_FIELD

    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    ids = IDS[:1, :8]
    full = model(ids, use_cache=False).logits[:, -1]
    kv = DynamicCache()
    out = model(ids[:, :7], **{name: kv})
    assert getattr(out, CACHE_FIELD) is kv and kv.get_seq_length() == 7
    step = model(ids[:, 7:], **{name: kv}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_save_and_reload_gives_identical_logits(tmp_path):
    source = make("qwen2")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "recursify" and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_recursify.")
    assert cfg["recursion"]["lora_rank"] == 4
    again = rf.RecursiveForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(IDS).logits, model(IDS).logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(auto(IDS).logits, model(IDS).logits)


def test_trust_remote_code_loads_in_a_process_that_never_imported_recursify(tmp_path):
    source = make("llama")
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    model.save_pretrained(tmp_path)
    expected = model(IDS).logits[0, -1, :3].tolist()
    code = (
        "import sys, torch, json\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "print(json.dumps(m(ids).logits[0, -1, :3].tolist()))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "VIRTUAL_ENV")})
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(expected, abs=1e-5)


def test_bad_configs_raise_clear_errors():
    source = make("llama")
    with pytest.raises(ValueError, match="larger than min"):
        rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=500), progress=False)
    with pytest.raises(ValueError, match="unknown strategy"):
        rf.RecursionConfig(strategy="spiral")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=2, lora_targets=["qkv"]), progress=False)
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40))
    with pytest.raises(rf.UnsupportedModelError, match="supports: gemma"):
        rf.convert(bert, rf.RecursionConfig(num_loops=2), progress=False)
    with pytest.raises(ValueError, match="no loop boundaries"):
        m = rf.convert(source, rf.RecursionConfig(num_loops=2, strategy="sequence"), progress=False)
        m(IDS, depth=torch.tensor([1, 2]))


def test_family_names_say_what_they_are_and_old_names_still_load():
    from recursify.families import detect_family, family_by_name
    from tiny_models import make

    assert detect_family(make("gemma").config).name == "gemma1"
    assert detect_family(make("gemma2").config).name == "gemma2"
    assert detect_family(make("gemma3").config).name == "gemma2"  # Gemma 3 is Gemma 2's layout + q/k norms
    assert family_by_name("gemma") is family_by_name("gemma2")  # what checkpoints written before the rename carry
