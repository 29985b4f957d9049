"""Gemma 1/2/3: (1 + w) RMSNorm in fp32, sqrt(hidden) embedding scale, GELU-tanh gated MLP.

Gemma 2 and 3 add sandwich norms (post-attention and post-MLP), alternating sliding-window
layers and soft-capping (Gemma 2); Gemma 3 adds q/k norms and a local RoPE base.
"""

from .registry import Family, register

_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

GEMMA = register(
    Family(
        name="gemma1",
        model_types=("gemma",),
        layers="model.layers",
        final_norm="model.norm",
        linears=_LINEARS,
        norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        norm_kind="rms_gemma",
        residual="sequential",
        scale_embeddings=True,
    )
)

GEMMA2 = register(
    Family(
        name="gemma2",  # Gemma 2 and 3 (Gemma 3 adds q/k norms, found in the config)
        model_types=("gemma2", "gemma3_text"),
        layers="model.layers",
        final_norm="model.norm",
        linears=_LINEARS,
        norms={
            "attn_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
            "q_norm": "self_attn.q_norm",
            "k_norm": "self_attn.k_norm",
        },
        norm_kind="rms_gemma",
        residual="sandwich",
        scale_embeddings=True,
    )
)
