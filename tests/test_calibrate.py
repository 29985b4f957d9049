"""Calibrated (activation-aware) conversion, checked against closed forms computed another way."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make

import recursify as rf
from recursify.conversion.calibrate import (
    CalibrationError,
    CalibrationStats,
    activation_aware_factors,
    cached_stats,
    collect_stats,
    linear_input_groups,
)
from recursify.lora import truncated_svd

GEN = torch.Generator().manual_seed(0)


def output_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """||(Delta - B A) C^{1/2}||_F^2 per matrix = trace(E C E^T): the squared output error per token."""
    E = (delta - B @ A).double()
    return torch.einsum("noi,nij,noj->n", E, cov.double(), E)


def _spd(n: int, d: int, spread: float = 4.0) -> torch.Tensor:
    """Random covariances with eigenvalues spread over `spread` decades, like real activations."""
    Q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=GEN, dtype=torch.float64))
    w = torch.logspace(0, -spread, d, dtype=torch.float64)
    return (Q * w.unsqueeze(-2)) @ Q.transpose(1, 2)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # out <= in and out > in take different paths
def test_identity_covariance_is_plain_svd(shape):
    delta = torch.randn(3, *shape, generator=GEN)
    eye = torch.eye(shape[1], dtype=torch.float64).expand(3, -1, -1)
    B, A = activation_aware_factors(delta, eye, rank=7, damp=0.0)
    B0, A0 = truncated_svd(delta, 7)
    torch.testing.assert_close(B @ A, B0 @ A0, rtol=1e-4, atol=1e-4)
    # the same convention as truncated_svd: unit rows of A
    torch.testing.assert_close(A.norm(dim=-1), torch.ones(3, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_full_rank_is_exact_whatever_the_covariance(shape, damp):
    delta = torch.randn(2, *shape, generator=GEN)
    B, A = activation_aware_factors(delta, _spd(2, shape[1]), rank=min(shape), damp=damp)
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_output_error_is_the_whitened_optimum_and_beats_plain_svd(shape):
    """With C = X^T X the best achievable ||(Delta - BA) X^T||^2 is the tail energy of the singular
    values of Delta C^{1/2} (Eckart-Young after whitening), computed here with a LAPACK SVD."""
    out_f, in_f = shape
    n, r = 2, 6
    C = _spd(n, in_f)
    delta = torch.randn(n, out_f, in_f, generator=GEN, dtype=torch.float64)
    w, Q = torch.linalg.eigh(C)
    root = (Q * w.clamp(min=0).sqrt().unsqueeze(-2)) @ Q.transpose(1, 2)
    s = torch.linalg.svdvals(delta @ root)
    optimum = (s[:, r:] ** 2).sum(-1)

    B, A = activation_aware_factors(delta, C, rank=r, damp=0.0)
    ours = output_error(delta, B, A, C)
    torch.testing.assert_close(ours, optimum, rtol=1e-6, atol=1e-9)
    B0, A0 = truncated_svd(delta, r)
    plain = output_error(delta, B0, A0, C)
    assert (ours < 0.9 * plain).all()


def test_output_error_matches_the_residual_on_samples():
    """output_error is the mean squared output residual over the samples that made C."""
    X = torch.randn(500, 16, generator=GEN, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    C = (X.T @ X / len(X)).unsqueeze(0)
    delta = torch.randn(1, 10, 16, generator=GEN, dtype=torch.float64)
    B, A = activation_aware_factors(delta, C, rank=3, damp=0.0)
    residual = ((X @ (delta[0] - B[0] @ A[0]).T) ** 2).sum() / len(X)
    torch.testing.assert_close(output_error(delta, B, A, C)[0], residual)


def test_linear_input_groups_follow_what_reads_the_same_tensor():
    assert linear_input_groups(make("llama")) == {
        "q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down",
    }
    assert set(linear_input_groups(make("gpt_neox")).values()) == {"qkv", "o", "up", "down"}


def test_collected_covariance_equals_the_first_layers_input():
    source = make("llama").eval()
    ids = torch.randint(0, 97, (3, 10), generator=GEN)
    stats = collect_stats(source, ids, batch_size=2, progress=False)
    with torch.no_grad():
        x = source.model.layers[0].input_layernorm(source.model.embed_tokens(ids)).reshape(-1, 64).double()
    assert stats.of("k").dtype == torch.float32  # one float32 stack per input (the closed forms go to float64)
    torch.testing.assert_close(stats.of("k")[0].double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert stats.num_tokens == 30 and stats.of("up").shape == (6, 64, 64) and stats.of("down").shape == (6, 96, 96)


def test_stats_round_trip_and_cache(tmp_path):
    source = make("qwen2").eval()
    ids = torch.randint(0, 97, (2, 8), generator=GEN)
    first = cached_stats(source, ids, tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = CalibrationStats.load(files[0])
    assert again.input_of == first.input_of and again.num_tokens == 16
    for k in first.cov:
        assert torch.equal(again.cov[k], first.cov[k])
    cached_stats(source, ids[:, :6], tmp_path, progress=False)  # other tokens: another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_truncated_cache_entry_warns_and_is_recomputed(tmp_path):
    source = make("qwen2").eval()
    ids = torch.randint(0, 97, (2, 8), generator=GEN)
    first = cached_stats(source, ids, tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # a run killed half-way through an older, non-atomic write
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        again = cached_stats(source, ids, tmp_path, progress=False)
    assert all(torch.equal(again.cov[k], first.cov[k]) for k in first.cov)
    assert CalibrationStats.load(entry).num_tokens == 16  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))


def test_token_ids_beyond_the_vocabulary_are_refused():
    with pytest.raises(CalibrationError, match="another tokenizer"):
        collect_stats(make("llama"), torch.full((1, 4), 500), progress=False)


def test_too_few_tokens_warn_and_still_convert():
    source = make("llama").eval()
    with pytest.warns(UserWarning, match="singular"):
        stats = collect_stats(source, torch.randint(0, 97, (1, 8), generator=GEN), progress=False)
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False, calibration=stats)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibrated_full_rank_reproduces_the_source(family):
    source = make(family).eval()
    ids = torch.randint(0, 97, (2, 12), generator=GEN)
    stats = collect_stats(source, ids, progress=False)
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank="full"), progress=False,
                       calibration=stats)
    assert (model(ids).logits - source(ids).logits).abs().max().item() < 1e-4
    assert model.recursion.calibration == {"tokens": 24, "damp": 0.01}


def test_calibrated_rank_fits_the_layer_outputs_better_than_plain_svd():
    """On the calibration inputs themselves, every position's attention-input linears see less
    output error with the calibrated init than with the plain one."""
    source = make("llama").eval()
    ids = torch.randint(0, 97, (4, 16), generator=GEN)
    stats = collect_stats(source, ids, progress=False)
    cfg = rf.RecursionConfig(num_loops=3, init="stepwise", lora_rank=4)
    plain = rf.convert(source, cfg, progress=False)
    calibrated = rf.convert(source, cfg, progress=False, calibration=stats, damp=0.0)
    W = torch.stack([layer.self_attn.q_proj.weight for layer in source.model.layers]).double()
    shared = torch.stack([plain.slots[s].linears["q"].weight for s in plain.layout.slot_of_position]).double()
    delta = W - shared
    errors = {}
    for name, model in (("plain", plain), ("calibrated", calibrated)):
        lora = model.lora["q"]
        errors[name] = output_error(delta, lora.lora_B.double(), lora.lora_A.double(), stats.of("q"))
    assert (errors["calibrated"] <= errors["plain"] * (1 + 1e-9)).all()
    assert errors["calibrated"].sum() < 0.9 * errors["plain"].sum()


def test_sequential_full_rank_without_damping_reproduces_the_source():
    """At full rank each position can be exact, so the student's inputs equal the teacher's and the
    least-squares correction D* = Delta: the whole model reproduces the source."""
    from recursify.conversion.sequential import sequential_calibrate

    source = make("qwen2").eval()
    ids = torch.randint(0, 97, (32, 16), generator=GEN)  # well over the widest input (96): C invertible
    model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank="full"), progress=False)
    for lora in model.lora.values():  # start from a wrong init: the fit must not depend on it
        lora.lora_A.data.normal_()
    sequential_calibrate(model, source, ids, damp=0.0, progress=False)
    assert (model(ids).logits - source(ids).logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_loop_view_is_the_source_on_the_sources_own_weights(family):
    """The sequential refit's teacher: the HF model's logits, with every linear and embedding
    sharing the source's storage (no copy of the weights) and nothing left on the meta device."""
    from recursify.conversion.sequential import one_loop_view

    source = make(family).eval()
    ids = torch.randint(0, 97, (2, 12), generator=GEN)
    view = one_loop_view(source)
    with torch.no_grad():
        assert (view(ids).logits - source(ids).logits).abs().max().item() < 1e-4
    assert not any(p.is_meta for p in view.parameters())
    source_ptrs = {p.data_ptr() for p in source.parameters()}
    linears = [m.weight for slot in view.slots for m in slot.linears.values()] + [view.embed_tokens.weight]
    assert all(w.data_ptr() in source_ptrs for w in linears)


def test_sequential_calibration_brings_the_outputs_closer_than_teacher_inputs_alone():
    from recursify.conversion.sequential import sequential_calibrate

    source = make("llama").eval()
    ids = torch.randint(0, 97, (8, 16), generator=GEN)
    stats = collect_stats(source, ids, progress=False)
    cfg = rf.RecursionConfig(num_loops=3, init="average", lora_rank=4)
    calibrated = rf.convert(source, cfg, progress=False, calibration=stats)
    sequential = rf.convert(source, cfg, progress=False, calibration=stats)
    sequential_calibrate(sequential, source, ids, progress=False)
    ref = source(ids).logits
    err = {n: (m(ids).logits - ref).pow(2).mean().item() for n, m in (("cal", calibrated), ("seq", sequential))}
    assert err["seq"] < 0.8 * err["cal"], err
