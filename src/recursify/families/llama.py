"""Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM. Pre-norm RMSNorm, gated SiLU MLP."""

from .registry import Family, register

LLAMA = register(
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        final_norm="model.norm",
        linears={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        },
        # q_norm/k_norm exist only in Qwen3; `Arch.qk_norm` says whether a checkpoint has them.
        norms={
            "attn_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "q_norm": "self_attn.q_norm",
            "k_norm": "self_attn.k_norm",
        },
        norm_kind="rms",
        residual="sequential",
    )
)
