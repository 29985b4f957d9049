"""Shared weights fitted to calibration statistics, and rank allocation to a parameter budget."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make

import recursify as rf
from recursify.config import ConfigError
from recursify.conversion.allocate import allocate_ranks, component_gains, parameter_count
from recursify.conversion.calibrate import activation_aware_factors, collect_stats, fit_shared

GEN = torch.Generator().manual_seed(0)


def captured_energy(spectra: dict[str, torch.Tensor], ranks: dict[str, int]) -> float:
    """Sum over linears of the relative output energy the chosen ranks remove (the greedy's objective)."""
    return float(sum(spectra[n][: ranks.get(n, 0)].sum() for n in spectra))


def _samples(n_layers: int, tokens: int, d: int) -> list[torch.Tensor]:
    """Per-layer inputs of very different scales and directions, as real layers see."""
    return [torch.randn(tokens, d, generator=GEN, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
            * (1 + 3 * l) for l in range(n_layers)]


def test_rank_zero_fit_is_the_weighted_least_squares_solution():
    """min over W_s of sum_l ||(W_l - W_s) X_l^T||^2, solved here as one stacked lstsq problem."""
    L, out_f, in_f = 4, 5, 7
    X = _samples(L, 50, in_f)
    W = torch.randn(L, out_f, in_f, generator=GEN, dtype=torch.float64)
    cov = torch.stack([x.T @ x / len(x) for x in X])
    shared = fit_shared(W, cov, [0, 1, 0, 1], rank=0, damp=0.0, normalise=False)
    for s in (0, 1):
        layers = [l for l in range(L) if l % 2 == s]
        A = torch.cat([X[l] for l in layers])  # rows: inputs; target rows: W_l x
        Y = torch.cat([X[l] @ W[l].T for l in layers])
        ref = torch.linalg.lstsq(A, Y).solution.T
        torch.testing.assert_close(shared[s], ref, rtol=1e-8, atol=1e-8)


def test_identity_covariances_give_the_average():
    W = torch.randn(4, 5, 7, generator=GEN, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64).expand(4, -1, -1)
    shared = fit_shared(W, eye, [0, 1, 0, 1], rank=0, damp=0.0)
    torch.testing.assert_close(shared, torch.stack([W[[0, 2]].mean(0), W[[1, 3]].mean(0)]))


def _objective(W, shared, cov, slots, rank):
    delta = W - shared[slots]
    B, A = activation_aware_factors(delta, cov, rank, damp=0.0)
    E = delta - B @ A
    return torch.einsum("noi,nij,noj->", E, cov, E).item()


def _one_position_at_a_time(monkeypatch, module):
    """What a 1B model's conversion does (a few positions per chunk), at a tiny model's size."""
    monkeypatch.setattr(module, "position_chunks", lambda stack: [slice(i, i + 1) for i in range(len(stack))])


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_joint_fit_lowers_the_output_error_of_the_average(normalise, chunked, monkeypatch):
    from recursify.conversion import calibrate

    if chunked:
        _one_position_at_a_time(monkeypatch, calibrate)
    L, out_f, in_f, r = 6, 8, 10, 2
    X = _samples(L, 80, in_f)
    cov = torch.stack([x.T @ x / len(x) for x in X])
    W = torch.randn(L, out_f, in_f, generator=GEN, dtype=torch.float64)
    slots = [0, 1, 2, 0, 1, 2]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).view(-1, 1, 1) if normalise else 1.0
    target = cov / scale  # the objective the fit minimises
    average = torch.stack([W[[s, s + 3]].mean(0) for s in range(3)])
    errors = [_objective(W, fit_shared(W, cov, slots, r, damp=0.0, iters=k, normalise=normalise), target, slots, r)
              for k in (1, 3)]
    assert errors[0] < _objective(W, average, target, slots, r)
    assert errors[1] <= errors[0] * (1 + 1e-9)


def test_calibrated_init_converts_and_needs_statistics():
    source = make("llama").eval()
    ids = torch.randint(0, 97, (4, 16), generator=GEN)
    stats = collect_stats(source, ids, progress=False)
    full = rf.convert(source, rf.RecursionConfig(num_loops=2, init="calibrated", lora_rank="full"), progress=False,
                      calibration=stats)
    assert (full(ids).logits - source(ids).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="calibration"):
        rf.convert(source, rf.RecursionConfig(num_loops=2, init="calibrated", lora_rank=4), progress=False)


@pytest.fixture(scope="module")
def calibrated_llama():
    source = make("llama").eval()
    stats = collect_stats(source, torch.randint(0, 97, (8, 16), generator=GEN), progress=False)
    return source, stats


def test_rank_pattern_sets_each_linears_rank(calibrated_llama):
    source, stats = calibrated_llama
    cfg = rf.RecursionConfig(num_loops=2, init="average", lora_rank=0, rank_pattern={"q": 3, "down": 5, "k": 0})
    model = rf.convert(source, cfg, progress=False, calibration=stats)
    assert {n: m.rank for n, m in model.lora.items()} == {"q": 3, "down": 5}
    with pytest.raises(ValueError, match="unknown LoRA target"):
        rf.convert(source, rf.RecursionConfig(num_loops=2, rank_pattern={"nope": 2}), progress=False)


def test_allocated_ranks_fit_the_budget_and_keep_more_energy_than_uniform(calibrated_llama):
    source, stats = calibrated_llama
    cfg = rf.RecursionConfig(num_loops=2, init="average")
    teacher = sum(p.numel() for p in source.parameters())
    uniform = rf.RecursionConfig(num_loops=2, init="average", lora_rank=6)
    target = parameter_count(source, uniform) / teacher
    ranks = allocate_ranks(source, cfg, stats, target)
    allocated = rf.RecursionConfig(num_loops=2, init="average", rank_pattern=ranks)
    # Within the budget, and no component the budget still had room for was left out.
    spare = target * teacher - parameter_count(source, allocated)
    layer = source.model.layers[0]
    weights = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
               "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj,
               "down": layer.mlp.down_proj}
    open_costs = [6 * sum(m.weight.shape) for n, m in weights.items() if ranks[n] < min(m.weight.shape)]
    assert 0 <= spare < min(open_costs)
    spectra = component_gains(source, cfg, stats)
    uniform_ranks = {n: min(6, len(s)) for n, s in spectra.items()}
    assert captured_energy(spectra, ranks) > captured_energy(spectra, uniform_ranks)
    # The model built from the pattern has exactly the counted parameters.
    model = rf.convert(source, allocated, progress=False, calibration=stats)
    assert model.parameter_breakdown()["total"] == parameter_count(source, allocated)


def test_a_budget_rank_zero_cannot_meet_is_one_clear_error(calibrated_llama):
    source, stats = calibrated_llama
    cfg = rf.RecursionConfig(num_loops=2, init="average")
    with pytest.raises(ConfigError, match="even rank 0"):
        allocate_ranks(source, cfg, stats, 0.05)
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        allocate_ranks(source, cfg, stats, 1.5)


@pytest.fixture(scope="module")
def curved_llama(calibrated_llama):
    from recursify.conversion.curvature import with_curvature

    source, stats = calibrated_llama
    return source, with_curvature(stats, source, torch.randint(0, 97, (4, 16), generator=GEN), cache=False,
                                  progress=False)


@pytest.mark.parametrize("chunked", [False, True])
def test_with_curvature_the_gains_are_the_fisher_weighted_errors_each_rank_removes(curved_llama, chunked, monkeypatch):
    """Cumulative gains = tr(G D C D^T) - tr(G E_r C E_r^T), E_r the residual of the conversion's own
    two-sided rank-r fit (G, C damped as the conversion damps them), summed over positions; also
    when the positions are taken one at a time (as a 1B model's are, a few at a time)."""
    from recursify.conversion import allocate
    from recursify.conversion.calibrate import OUT_DAMP, _damped

    if chunked:
        _one_position_at_a_time(monkeypatch, allocate)
    source, stats = curved_llama
    cfg = rf.RecursionConfig(num_loops=2, init="average")
    spectra = component_gains(source, cfg, stats)
    layers = source.model.layers
    for name, path in [("q", "self_attn.q_proj"), ("v", "self_attn.v_proj"), ("down", "mlp.down_proj")]:
        W = torch.stack([layer.get_submodule(path).weight.double() for layer in layers])
        slots = torch.tensor(rf.Layout.build(len(layers), cfg).slot_of_position)
        D = W - torch.stack([W[slots == s].mean(0) for s in range(int(slots.max()) + 1)])[slots]
        C, G = _damped(stats.of(name).double(), 0.01), _damped(stats.out_of(name).double(), OUT_DAMP)

        def weighted(E):
            return torch.einsum("noi,nij,npj,nop->", E, C, E, G).item()

        for r in (1, 3):
            B, A = activation_aware_factors(D, stats.of(name), r, damp=0.01, out_cov=stats.out_of(name))
            expected = weighted(D) - weighted(D - B.double() @ A.double())
            assert float(spectra[name][:r].sum()) == pytest.approx(expected, rel=1e-6)


def test_a_linear_whose_errors_the_model_notices_more_gets_more_rank(curved_llama):
    import dataclasses

    source, stats = curved_llama
    cfg = rf.RecursionConfig(num_loops=2, init="average")
    teacher = sum(p.numel() for p in source.parameters())
    target = parameter_count(source, rf.RecursionConfig(num_loops=2, init="average", lora_rank=4)) / teacher
    before = allocate_ranks(source, cfg, stats, target)
    louder = dataclasses.replace(stats, curvature={**stats.curvature, "up": stats.curvature["up"] * 1e3})
    after = allocate_ranks(source, cfg, louder, target)
    assert after["up"] > before["up"]
    assert all(after[n] <= before[n] for n in before if n != "up")
