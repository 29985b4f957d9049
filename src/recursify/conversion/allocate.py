"""Rank allocation: spend a parameter budget where the layers' outputs gain the most.

A uniform rank gives every linear the same number of components, although the spectra of
Delta_l C_l Delta_l^T differ widely between linears: some are nearly low-rank, others flat. The
k-th eigenvalue is exactly how much output error the k-th component removes (the calibrated
closed form keeps the top ones), so with every linear's error measured relative to its own output
energy, trace(W_l C_l W_l^T), the gains are comparable, and a greedy choice by gain per parameter
is optimal because each linear's gains only decrease with rank.

With the output curvature (`recursify.conversion.curvature`) the gains need no such normalising: the k-th
eigenvalue of G^{1/2} Delta_l C_l Delta_l^T G^{1/2} is, to second order, the distillation loss the
k-th component removes (K-FAC's G (x) C block of the Fisher), in the same units for every linear
and position, so the budget goes where the model's predictions notice the error. Measured on
SmolLM2 it moves rank from attention to the MLPs, whose truncation costs far more.

One rank per linear, the same for every position, so the adapters keep their stacked layout.
"""

from __future__ import annotations

import heapq

import torch

from ..config import ConfigError, Layout, RecursionConfig
from ..families import arch_from_config, detect_family
from ..modeling import RecursiveForCausalLM, lora_targets
from .calibrate import OUT_DAMP, CalibrationStats, _damped, position_chunks, psd_root


def parameter_count(source, recursion: RecursionConfig) -> int:
    """Parameters of the recursive model `recursion` describes, counted without building weights."""
    from .convert import build_config

    with torch.device("meta"):
        model = RecursiveForCausalLM(build_config(source, recursion))
    return model.parameter_breakdown()["total"]


def macs_per_token(source, recursion: RecursionConfig | None = None) -> int:
    """Multiply-adds per decoded token in the linear layers and the LM head (attention's scores,
    which grow with the context, left out): the source's own when `recursion` is None, else the
    recursive model's, whose every unrolled position runs its slot's full-size linears plus its
    LoRA (the decode path keeps the adapter: r * (d_in + d_out) more per linear)."""
    from .convert import build_config

    family = detect_family(source.config)
    arch = arch_from_config(family, source.config)
    head = arch.hidden_size * arch.vocab_size
    dense = sum(arch.linear_shape(n)[0] * arch.linear_shape(n)[1] for n in family.linears)
    if recursion is None:
        return arch.num_layers * dense + head
    with torch.device("meta"):
        model = RecursiveForCausalLM(build_config(source, recursion))
    lora = sum(m.rank * (m.lora_A.shape[-1] + m.lora_B.shape[1]) for m in model.lora.values())
    return arch.num_layers * (dense + lora) + head


@torch.no_grad()
def component_gains(source, recursion: RecursionConfig, calibration: CalibrationStats,
                     damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Per target linear, the output error each successive component removes, summed over positions:
    [min(d_in, d_out)], non-increasing. Without curvature each position's error is a fraction of its
    output energy; with it, the Fisher-weighted error (comparable as it is).

    Shared weights follow `recursion.init` (the calibrated fit at rank 0, since the ranks are what
    is being chosen).
    """
    from .convert import shared_weights

    if recursion.init == "random":
        raise ConfigError("rank allocation reads the weight differences to the shared weights: use a non-random init")
    family = detect_family(source.config)
    layers = list(source.get_submodule(family.layers))
    layout = Layout.build(len(layers), recursion)
    spectra = {}
    slots = list(layout.slot_of_position)
    for name in lora_targets(family, recursion):
        W = torch.stack([layer.get_submodule(family.linears[name]).weight.float() for layer in layers])
        shared = shared_weights(W, layout, recursion.init, calibration.of(name), 0, damp)
        fisher = calibration.out_of(name) is not None
        total = None
        # A few positions at a time, as the conversion: the float64 temporaries of one chunk, never of all L.
        for idx in position_chunks(W):
            C = _damped(calibration.of(name)[idx].double().to(W.device), damp)
            D = (W[idx] - shared[slots[idx]]).double()
            if fisher:  # G^{1/2} Delta, with G damped as the conversion damps it
                D = psd_root(_damped(calibration.out_of(name)[idx].to(D), OUT_DAMP)) @ D
            out_f, in_f = D.shape[1:]
            if out_f <= in_f:
                ev = torch.linalg.eigvalsh(D @ C @ D.transpose(1, 2))
            else:
                M = D @ psd_root(C)
                ev = torch.linalg.eigvalsh(M.transpose(1, 2) @ M)
            gains = ev.flip(-1).clamp(min=0)
            if not fisher:
                Wd = W[idx].double()
                energy = torch.einsum("loi,lij,loj->l", Wd, C, Wd).clamp(min=1e-30)
                gains = gains / energy.unsqueeze(-1)
            total = gains.sum(0) if total is None else total + gains.sum(0)
        spectra[name] = total.cpu()
    return spectra


def allocate_ranks(source, recursion: RecursionConfig, calibration: CalibrationStats, target_params: float,
                   damp: float = 0.01) -> dict[str, int]:
    """Per-linear ranks (a `rank_pattern`) removing the most output error within `target_params` x the
    source model's parameters: Fisher-weighted when `calibration` has the curvature, else relative."""
    if not 0 < target_params <= 1:
        raise ConfigError(f"--target-params is a fraction of the source model's parameters in (0, 1], got {target_params}")
    teacher = sum(p.numel() for p in {id(p): p for p in source.parameters()}.values())
    family = detect_family(source.config)
    base_cfg = RecursionConfig.from_dict({**recursion.to_dict(), "lora_rank": 0, "rank_pattern": None})
    base = parameter_count(source, base_cfg)
    budget = int(target_params * teacher) - base
    if budget < 0:
        raise ConfigError(f"--target-params {target_params:g} is {target_params * teacher / 1e6:.1f}M parameters, but even "
                          f"rank 0 has {base / 1e6:.1f}M ({base / teacher:.1%} of the source): use more loops or a larger target")
    spectra = component_gains(source, recursion, calibration, damp)
    positions = len(list(source.get_submodule(family.layers)))
    layer = next(iter(source.get_submodule(family.layers)))
    cost = {}
    for name in spectra:
        w = layer.get_submodule(family.linears[name]).weight
        cost[name] = positions * (w.shape[0] + w.shape[1])
    ranks = {name: 0 for name in spectra}
    heap = [(-float(s[0]) / cost[n], n) for n, s in spectra.items() if len(s)]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if cost[name] > budget:
            continue  # this linear's next component no longer fits; cheaper ones may
        budget -= cost[name]
        ranks[name] += 1
        if ranks[name] < len(spectra[name]):
            heapq.heappush(heap, (-float(spectra[name][ranks[name]]) / cost[name], name))
    return ranks
