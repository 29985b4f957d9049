"""The families recursify knows, by name and by Hugging Face model type.

Each family module registers its `Family` here on import; the package imports them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The source model is not a decoder-only family recursify knows."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the decoder-layer ModuleList in the HF causal LM
    final_norm: str
    linears: dict[str, str]  # short name -> path inside a decoder layer
    norms: dict[str, str]  # short name -> path inside a decoder layer
    norm_kind: str  # "rms" (w * x), "rms_gemma" ((1 + w) * x, in fp32), "layernorm" (w * x + b)
    residual: str  # "sequential", "sandwich" (Gemma 2/3 post-norms) or "parallel" (GPT-NeoX)
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden)
    fused_qkv: bool = False  # GPT-NeoX: one [3*heads*head_dim, hidden] projection, per-head interleaved


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


_RENAMED = {"gemma": "gemma2"}  # names older checkpoints carry


def family_by_name(name: str) -> Family:
    return _FAMILIES[_RENAMED.get(name, name)]


def supported_model_types() -> list[str]:
    return sorted(t for f in _FAMILIES.values() for t in f.model_types)


def detect_family(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; recursify supports: {', '.join(supported_model_types())}"
    )
