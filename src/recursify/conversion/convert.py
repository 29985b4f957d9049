"""Conversion: pick shared weights for each slot, then initialise the depth-wise LoRA.

For every target linear the source weights of all L layers are stacked once ([L, out, in]);
shared-weight init and the SVD of W_l - W_shared are then a handful of batched tensor ops,
which is what keeps a 135M-parameter conversion within seconds on a laptop CPU.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..config import Layout, RecursionConfig, RecursiveConfig
from ..families import Family, detect_family
from ..lora import truncated_svd
from ..modeling import RecursiveForCausalLM
from ..util.device import resolve_device, resolve_dtype
from .calibrate import CalibrationStats, activation_aware_factors, fit_shared, position_chunks

AUTO_MAP = {
    "AutoConfig": "configuration_recursify.RecursiveConfig",
    "AutoModelForCausalLM": "modeling_recursify.RecursiveForCausalLM",
}


def evenly_spaced(first: int, last: int, k: int) -> list[int]:
    """k layer indices from first to last, both kept: round(linspace(first, last, k)), half to even."""
    return torch.linspace(first, last, k).round().long().tolist() if k > 1 else [first]


def source_layer_for_slot(layout: Layout, init: str) -> list[int]:
    """Which source layer each slot copies under `stepwise` and `lower`.

    stepwise: round(linspace(first, last, K)) over the shared span, so the first and last layers
    are always included; lower: the first K layers of the shared span.
    """
    L, e, K = layout.num_layers, layout.edge, layout.block_size
    first, last = e, L - 1 - e
    if init == "stepwise":
        block = evenly_spaced(first, last, K)
    elif init == "lower":
        block = list(range(first, first + K))
    else:
        raise ValueError(init)
    return ([0] if e else []) + block + ([L - 1] if e else [])


def _init_slots(stack: torch.Tensor, layout: Layout, init: str) -> torch.Tensor:
    """Shared values [num_slots, ...] from per-layer values [L, ...]."""
    if init == "average":
        return torch.stack([stack[layout.positions_of_slot(s)].mean(0) for s in range(layout.num_slots)])
    return stack[source_layer_for_slot(layout, init)].clone()


def shared_weights(W: torch.Tensor, layout: Layout, init: str, cov: torch.Tensor | None = None, rank: int = 0,
                   damp: float = 0.01) -> torch.Tensor:
    """Shared weights [num_slots, out, in] from the stacked source weights W [L, out, in]."""
    if init == "calibrated":
        return fit_shared(W, cov, layout.slot_of_position, rank, damp=damp)
    return _init_slots(W, layout, init)


def build_config(source: PreTrainedModel, recursion: RecursionConfig) -> RecursiveConfig:
    family = detect_family(source.config)
    base = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "auto_map", "transformers_version"):
        base.pop(key, None)
    config = RecursiveConfig(base_config=base, recursion=recursion.to_dict(), family=family.name)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["RecursiveForCausalLM"]
    return config


@torch.no_grad()
def convert(
    source: PreTrainedModel,
    recursion: RecursionConfig,
    progress: bool = True,
    calibration: CalibrationStats | None = None,
    damp: float = 0.01,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> RecursiveForCausalLM:
    """Turn a Hugging Face causal LM into a (relaxed) recursive model, per `recursion`.

    With `calibration` (see `recursify.conversion.calibrate`), the SVD-initialised LoRA fits what each
    layer's outputs see on real text instead of the raw weight difference; the checkpoint's
    config records how many tokens it was calibrated on.

    The decompositions run on the source's device in float32 (float64 inside `truncated_svd`
    and the calibrated closed forms), whatever the source's dtype; the result is then cast to
    `dtype` (default float32) and moved to `device` (default: the source's device).
    """
    work = next(source.parameters()).device
    target = resolve_device(device) if device is not None else work
    out_dtype = resolve_dtype(dtype, target) if dtype is not None else torch.float32
    if recursion.init == "calibrated" and calibration is None:
        raise ValueError("init='calibrated' fits the shared weights to calibration statistics: pass calibration=")
    if calibration is not None:
        recursion = RecursionConfig.from_dict(
            {**recursion.to_dict(), "calibration": {"tokens": calibration.num_tokens, "damp": damp,
                                                    **({"curvature_tokens": calibration.curvature_tokens}
                                                       if calibration.curvature else {})}}
        )
    config = build_config(source, recursion)
    family: Family = detect_family(source.config)
    if recursion.init == "random":
        torch.manual_seed(recursion.seed)
    with torch.device(work):
        model = RecursiveForCausalLM(config).float()
    layout = model.layout
    layers = list(source.get_submodule(family.layers))

    steps = list(family.linears) + ["norms"]
    bar = tqdm(steps, desc="converting", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        if name == "norms":
            for short in model.norm_names:
                stack = torch.stack([layer.get_submodule(family.norms[short]).weight.float() for layer in layers])
                model.norm_weight[short].copy_(_norms(stack, layout, recursion))
                if short in model.norm_bias:
                    stack = torch.stack([layer.get_submodule(family.norms[short]).bias.float() for layer in layers])
                    model.norm_bias[short].copy_(_norms(stack, layout, recursion))
            continue
        W = torch.stack([layer.get_submodule(family.linears[name]).weight.float() for layer in layers])  # [L, out, in]
        if name in model.bias:
            stack = torch.stack([layer.get_submodule(family.linears[name]).bias.float() for layer in layers])
            model.bias[name].copy_(_norms(stack, layout, recursion))
        if recursion.init != "random":
            rank = model.lora[name].rank if name in model.lora else 0
            shared = shared_weights(W, layout, recursion.init, calibration.of(name) if calibration else None, rank, damp)
            for s in range(layout.num_slots):
                model.slots[s].linears[name].weight.copy_(shared[s])
        shared = torch.stack([model.slots[s].linears[name].weight for s in range(layout.num_slots)])
        delta = W - shared[list(layout.slot_of_position)]
        if name in model.diag and recursion.lora_init == "svd":
            m = model.diag[name].size
            d = torch.diagonal(delta[:, :m, :m], dim1=-2, dim2=-1)
            model.diag[name].diag.copy_(d)
            delta[:, :m, :m] -= torch.diag_embed(d)
        if name in model.lora and recursion.lora_init == "svd":
            lora = model.lora[name]
            # A few positions at a time: the float64 temporaries of one chunk, never of all L.
            for idx in position_chunks(delta):
                if calibration is not None:
                    out_cov = calibration.out_of(name)
                    B, A = activation_aware_factors(delta[idx], calibration.of(name)[idx], lora.rank, damp=damp,
                                                  out_cov=None if out_cov is None else out_cov[idx])
                else:
                    B, A = truncated_svd(delta[idx], lora.rank)
                lora.lora_B[idx] = B
                lora.lora_A[idx] = A
        elif name in model.lora:
            # Zero init: A small random, B zero, so the model starts as the plain recursive one.
            torch.nn.init.normal_(model.lora[name].lora_A, std=1.0 / model.lora[name].lora_A.shape[-1] ** 0.5)
            model.lora[name].lora_B.zero_()

    model.embed_tokens.weight.copy_(source.get_input_embeddings().weight.float())
    final = source.get_submodule(family.final_norm)
    model.final_norm_weight.copy_(final.weight.float())
    if model.final_norm_bias is not None:
        model.final_norm_bias.copy_(final.bias.float())
    if not model.arch.tie_word_embeddings:
        model.lm_head.weight.copy_(source.get_output_embeddings().weight.float())
    else:
        model.tie_weights()
    return model.to(device=target, dtype=out_dtype).eval()


@torch.no_grad()
def with_rank(model: RecursiveForCausalLM, rank) -> RecursiveForCausalLM:
    """The same conversion at a lower LoRA rank, by keeping the leading SVD components.

    A truncated SVD at rank r is the first r components of any higher-rank one, so a single
    full-rank conversion yields every lower rank without another decomposition (what an ablation
    over ranks needs). Only meaningful for SVD-initialised adapters that were not trained since.
    """
    if model.recursion.lora_init != "svd":
        raise ValueError("with_rank needs SVD-initialised adapters (lora_init='svd')")
    config = copy.deepcopy(model.config)
    config.recursion = RecursionConfig.from_dict({**model.recursion.to_dict(), "lora_rank": rank}).to_dict()
    new = RecursiveForCausalLM(config).float()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lora.")}
    for name, lora in new.lora.items():
        old = model.lora[name] if name in model.lora else None
        if old is None or old.rank < lora.rank:
            raise ValueError(f"the source model's {name!r} adapter has rank {old.rank if old else 0} < {lora.rank}")
        state[f"lora.{name}.lora_A"] = old.lora_A[:, : lora.rank]
        state[f"lora.{name}.lora_B"] = old.lora_B[:, :, : lora.rank]
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"with_rank: state does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if new.arch.tie_word_embeddings:
        new.tie_weights()
    return new.eval()


def _norms(stack: torch.Tensor, layout: Layout, recursion: RecursionConfig) -> torch.Tensor:
    """Per-position copies by default; per-slot values (same init rule) with share_norms."""
    if not recursion.share_norms:
        return stack
    if recursion.init in ("random", "calibrated"):
        return _init_slots(stack, layout, "average")
    return _init_slots(stack, layout, recursion.init)


__all__ = ["convert", "with_rank", "build_config", "shared_weights", "source_layer_for_slot", "AUTO_MAP"]
