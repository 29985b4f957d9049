"""What a distillation run trains, and the AdamW that trains it."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig, TrainError

__all__ = ["build_optimizer"]

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def _is_trainable(name: str, mode: str) -> bool:
    """Parameter groups by name: slots.* shared weights, lora.*/diag.* relaxation, the rest embeddings/norms/head."""
    if mode == "all":
        return True
    if mode == "body":  # the recursive model's names and a plain Hugging Face model's
        return not {"embed_tokens", "lm_head", "embed_in", "embed_out"} & set(name.split("."))
    if mode == "lora":
        return name.startswith(("lora.", "diag."))
    if mode == "shared":
        return name.startswith("slots.")
    return name.startswith(("lora.", "diag.", "norm_", "bias.", "final_norm"))  # norms


def _decays(name: str) -> bool:
    """No weight decay on norms, biases and diagonals (they are gains/offsets, not projections)."""
    return not ("norm" in name or "bias" in name or name.startswith("diag."))


def build_optimizer(cfg: TrainConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameters `trainable` selects, without decay on gains and offsets."""
    for name, p in student.named_parameters():
        p.requires_grad_(_is_trainable(name, cfg.trainable))
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"trainable={cfg.trainable!r} selects no parameter of this student")
    groups = [  # (decay or not) x (shared weight or not): shared weights may take a smaller step
        {"params": [p for n, p in params if _decays(n) == decay and n.startswith("slots.") == shared],
         "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * (cfg.shared_lr_scale if shared else 1.0)}
        for decay in (True, False) for shared in (False, True)
    ]
    student.train()
    # The fused kernel updates each tensor in one pass: the unfused one makes two temporaries the
    # size of the largest parameter (the embeddings: 0.8 GiB on a 1B model), on top of the peak.
    fused = all(p.device.type in FUSED_DEVICES for _, p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
