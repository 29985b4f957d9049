"""Parameter-matched baselines: plain (non-recursive) models built from a subset of the source layers.

A recursive model with K unique layers is only worth having if it beats a plain K-layer model of
the same size. These builders give the two obvious ones as ordinary Hugging Face models of the
source family, so every tool (training, lm-eval, generation) treats them like any other model:

* `truncated(model, k)`: the first k layers plus the final norm and head;
* `layer_subset(model, layers)`: any chosen layers in order, e.g. the ones a stepwise
  conversion shares (`convert.source_layer_for_slot`), i.e. the recursive model's shared block
  run once, without looping;
* `matched(model, params)`: the largest stepwise subset (first and last layer kept) with at most
  `params` parameters: the plain model a relaxed recursive model of that size has to beat.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..families import detect_family


@torch.no_grad()
def layer_subset(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A plain model of the same family made of `layers` (source indices, in this order)."""
    family = detect_family(model.config)
    source_layers = model.get_submodule(family.layers)
    n = len(source_layers)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layer indices must be in [0, {n}), got {layers}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    new = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    prefix = family.layers + "."
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = new.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith(prefix) and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"layer_subset: state does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for target, i in zip(new.get_submodule(family.layers), layers):
        target.load_state_dict(source_layers[i].state_dict())
    if cfg.tie_word_embeddings:
        new.tie_weights()
    else:
        new.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight)
    return new.eval()


def truncated(model: PreTrainedModel, k: int) -> PreTrainedModel:
    """The first k layers + final norm + head."""
    return layer_subset(model, list(range(k)))


def matched(model: PreTrainedModel, params: int) -> PreTrainedModel:
    """The plain stepwise layer subset with the most layers whose parameter count is <= `params`."""
    from .convert import evenly_spaced

    family = detect_family(model.config)
    layers = model.get_submodule(family.layers)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    rest = sum(p.numel() for p in model.parameters()) - sum(per_layer)
    fits = [k for k in range(1, len(layers) + 1)
            if rest + sum(per_layer[i] for i in evenly_spaced(0, len(layers) - 1, k)) <= params]
    if not fits:
        raise ValueError(f"no plain subset of this model has at most {params} parameters "
                         f"(one layer and the embeddings already take {rest + min(per_layer)})")
    return layer_subset(model, evenly_spaced(0, len(layers) - 1, max(fits)))


__all__ = ["layer_subset", "matched", "truncated"]
