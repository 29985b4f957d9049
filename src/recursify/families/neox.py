"""GPT-NeoX / Pythia: LayerNorm with bias, fused per-head QKV, partial rotary, parallel residual."""

from .registry import Family, register

NEOX = register(
    Family(
        name="neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        linears={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        norms={"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        norm_kind="layernorm",
        residual="parallel",
        fused_qkv=True,
    )
)
