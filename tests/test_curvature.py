"""Output-side curvature (K-FAC's G factor) and the two-sided closed form that uses it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make

import recursify as rf
from recursify.conversion.calibrate import CalibrationStats, activation_aware_factors, cached_stats, collect_stats
from recursify.conversion.curvature import cached_curvature, collect_curvature

GEN = torch.Generator().manual_seed(1)


def _spd(n: int, d: int, spread: float = 4.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=GEN, dtype=torch.float64))
    w = torch.logspace(0, -spread, d, dtype=torch.float64)
    return (Q * w.unsqueeze(-2)) @ Q.transpose(1, 2)


def _root(M: torch.Tensor) -> torch.Tensor:
    w, Q = torch.linalg.eigh(M)
    return (Q * w.clamp(min=0).sqrt().unsqueeze(-2)) @ Q.transpose(1, 2)


def two_sided_error(delta, B, A, C, G) -> torch.Tensor:
    """tr(G E C E^T) per matrix: the K-FAC quadratic form of the weight error E."""
    E = (delta - B @ A).double()
    return torch.einsum("nab,nbi,nij,naj->n", G, E, C, E)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_two_sided_error_is_the_optimum_and_beats_input_only(shape):
    """The best rank-r tr(G E C E^T) is the tail energy of the singular values of G^{1/2} Delta C^{1/2}
    (Eckart-Young after whitening both sides), computed here with a LAPACK SVD."""
    out_f, in_f = shape
    n, r = 2, 6
    C, G = _spd(n, in_f), _spd(n, out_f)
    delta = torch.randn(n, out_f, in_f, generator=GEN, dtype=torch.float64)
    s = torch.linalg.svdvals(_root(G) @ delta @ _root(C))
    optimum = (s[:, r:] ** 2).sum(-1)

    B, A = activation_aware_factors(delta, C, rank=r, damp=0.0, out_cov=G, out_damp=0.0)
    ours = two_sided_error(delta, B, A, C, G)
    torch.testing.assert_close(ours, optimum, rtol=1e-6, atol=1e-9)
    B1, A1 = activation_aware_factors(delta, C, rank=r, damp=0.0)
    assert (ours < 0.9 * two_sided_error(delta, B1, A1, C, G)).all()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_identity_output_curvature_changes_nothing_and_full_rank_stays_exact(shape):
    delta = torch.randn(2, *shape, generator=GEN, dtype=torch.float64)
    C = _spd(2, shape[1])
    eye = torch.eye(shape[0], dtype=torch.float64).expand(2, -1, -1)
    B, A = activation_aware_factors(delta, C, rank=5, damp=0.0, out_cov=eye * 3.0)
    B0, A0 = activation_aware_factors(delta, C, rank=5, damp=0.0)
    torch.testing.assert_close(B @ A, B0 @ A0, rtol=1e-8, atol=1e-8)
    B, A = activation_aware_factors(delta, C, rank=min(shape), damp=0.01, out_cov=_spd(2, shape[0]), out_damp=0.0)
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-6)


def test_curvature_equals_the_output_gradient_outer_product():
    """Against autograd directly: the retained gradient of layer 1's o_proj output, with the labels
    drawn the same way (one batch, seed 0), gives the same mean g g^T."""
    source = make("llama").eval()
    ids = torch.randint(0, 97, (3, 10), generator=GEN)
    G = collect_curvature(source, ids, batch_size=3, seed=0, progress=False)
    assert G["o"].shape == (6, 64, 64) and G["down"].shape == (6, 64, 64) and G["gate"].shape == (6, 96, 96)

    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["o"] = out

    handle = source.model.layers[1].self_attn.o_proj.register_forward_hook(keep)
    x = source.model.embed_tokens(ids).detach().requires_grad_(True)
    logits = source(inputs_embeds=x, use_cache=False).logits.float()
    probs = logits.detach().softmax(-1).flatten(0, 1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).view(ids.shape)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    handle.remove()
    g = kept["o"].grad.reshape(-1, 64).double()
    ref = g.T @ g / ids.numel()  # float32 gradients: agreement to float32 precision of the largest entry
    assert G["o"].dtype == torch.float32  # accumulated in place in float32, as the input statistics
    torch.testing.assert_close(G["o"][1].double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    source.zero_grad(set_to_none=True)


def test_collection_leaves_the_model_as_it_was():
    source = make("qwen2")
    source.train()
    source.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in source.named_parameters()}
    collect_curvature(source, torch.randint(0, 97, (2, 8), generator=GEN), progress=False)
    assert source.training
    assert {n: p.requires_grad for n, p in source.named_parameters()} == flags
    assert all(p.grad is None for p in source.parameters())


def test_curvature_round_trips_through_the_stats_file_and_its_cache(tmp_path):
    source = make("llama").eval()
    ids = torch.randint(0, 97, (2, 8), generator=GEN)
    stats = cached_stats(source, ids, tmp_path / "stats", progress=False)
    stats.curvature = cached_curvature(source, ids, tmp_path / "stats", progress=False)
    assert len(list((tmp_path / "stats").glob("*.curvature.safetensors"))) == 1
    again = cached_curvature(source, ids, tmp_path / "stats", progress=False)
    assert all(torch.equal(again[k], stats.curvature[k]) for k in stats.curvature)
    stats.save(tmp_path / "both.safetensors")
    loaded = CalibrationStats.load(tmp_path / "both.safetensors")
    assert set(loaded.cov) == set(stats.cov) and set(loaded.curvature) == set(stats.curvature)
    assert torch.equal(loaded.out_of("v"), stats.curvature["v"])
    stats.curvature = None
    stats.save(tmp_path / "inputs.safetensors")
    assert CalibrationStats.load(tmp_path / "inputs.safetensors").curvature is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_sided_full_rank_reproduces_the_source(family):
    source = make(family).eval()
    ids = torch.randint(0, 97, (2, 12), generator=GEN)
    stats = collect_stats(source, ids, progress=False)
    stats.curvature = collect_curvature(source, ids, progress=False)
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank="full"), progress=False,
                       calibration=stats)
    assert (model(ids).logits - source(ids).logits).abs().max().item() < 1e-4


def test_two_sided_sequential_full_rank_reproduces_the_source():
    from recursify.conversion.sequential import sequential_calibrate

    source = make("qwen2").eval()
    ids = torch.randint(0, 97, (32, 16), generator=GEN)
    curvature = collect_curvature(source, ids, progress=False)
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank="full"), progress=False)
    for lora in model.lora.values():
        lora.lora_A.data.normal_()
    sequential_calibrate(model, source, ids, damp=0.0, progress=False, curvature=curvature)
    assert (model(ids).logits - source(ids).logits).abs().max().item() < 1e-3


def test_token_ids_beyond_the_vocabulary_are_one_clear_error():
    from recursify.conversion.calibrate import CalibrationError

    with pytest.raises(CalibrationError, match="another tokenizer"):
        collect_curvature(make("llama"), torch.full((1, 4), 500), progress=False)
