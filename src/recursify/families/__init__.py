"""Per-architecture knowledge, kept as data.

A `Family` says where a Hugging Face model keeps its weights and which knobs its decoder layer
turns (norm style, sandwich norms, parallel residual, fused QKV). `Arch` reads the numbers that
vary per checkpoint (sizes, rotary, sliding windows, soft-capping) from the HF config. The
recursive model is written once against these two objects, as litgpt does per family.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from .registry import Family, UnsupportedModelError, detect_family, family_by_name, register, supported_model_types
from . import gemma, llama, neox  # noqa: F401  (importing each registers its family)

__all__ = ["Arch", "Family", "UnsupportedModelError", "arch_from_config", "detect_family", "family_by_name",
           "hf_config_from_dict", "register", "rotary_embedding", "supported_model_types"]


@dataclass
class Arch:
    """The per-checkpoint numbers a decoder layer needs, read once from the HF config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: str
    scaling: float
    layer_types: list[str]
    sliding_window: int | None
    attn_softcap: float | None
    final_softcap: float | None
    qk_norm: bool
    parallel_residual: bool
    linear_bias: dict[str, bool]
    tie_word_embeddings: bool
    rope_per_layer_type: bool = False  # Gemma 3: full and sliding layers use different RoPE bases

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a layer linear."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        return {
            "q": (d, h * hd),
            "k": (d, kv * hd),
            "v": (d, kv * hd),
            "qkv": (d, 3 * h * hd),
            "o": (h * hd, d),
            "gate": (d, f),
            "up": (d, f),
            "down": (f, d),
        }[name]

    def norm_dim(self, name: str) -> int:
        return self.head_dim if name in ("q_norm", "k_norm") else self.hidden_size


def arch_from_config(family: Family, config: PretrainedConfig) -> Arch:
    c = config
    L = c.num_hidden_layers
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    layer_types = list(getattr(c, "layer_types", None) or [])
    sliding = getattr(c, "sliding_window", None)
    if not layer_types:
        layer_types = ["sliding_attention" if sliding else "full_attention"] * L
    if getattr(c, "use_sliding_window", True) is False:
        layer_types = ["full_attention"] * L
    scaling = (getattr(c, "query_pre_attn_scalar", None) or head_dim) ** -0.5  # Gemma 2/3 set it
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
    attn_bias = bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    bias = {n: False for n in family.linears}
    if family.name == "neox":
        bias = {n: attn_bias if n in ("qkv", "o") else True for n in family.linears}
    elif c.model_type == "qwen2":
        bias.update(q=True, k=True, v=True, o=False)
    else:
        bias.update({n: attn_bias for n in ("q", "k", "v", "o") if n in bias})
        bias.update({n: mlp_bias for n in ("gate", "up", "down") if n in bias})
    return Arch(
        num_layers=L,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        eps=getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", 1e-5),
        act=act,
        scaling=scaling,
        layer_types=layer_types,
        sliding_window=sliding,
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        final_softcap=getattr(c, "final_logit_softcapping", None),
        qk_norm=c.model_type in ("qwen3", "gemma3_text"),
        parallel_residual=bool(getattr(c, "use_parallel_residual", False)),
        linear_bias=bias,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_per_layer_type=c.model_type == "gemma3_text",
    )


def hf_config_from_dict(data: dict) -> PretrainedConfig:
    data = dict(data)
    model_type = data.pop("model_type")
    data.pop("quantization_config", None)
    return AutoConfig.for_model(model_type, **data)


def rotary_embedding(config: PretrainedConfig):
    """The source model's own rotary module, so every RoPE variant (scaling types, partial
    rotary, per-layer-type bases) matches the reference by construction."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    module = importlib.import_module(getattr(importlib.import_module("transformers"), class_name).__module__)
    candidates = [
        obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and name.endswith("RotaryEmbedding") and obj.__module__ == module.__name__
    ]
    if not candidates:
        raise UnsupportedModelError(f"no rotary embedding found for {config.model_type!r}")
    return candidates[0](config)

