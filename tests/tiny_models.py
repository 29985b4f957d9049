"""Tiny random Hugging Face models of every supported family: the references for exactness."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              max_position_embeddings=128)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False))


def _llama_tied():
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True))


def _mistral():
    return MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=5))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2))


def _qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16))


def _gemma():
    return GemmaForCausalLM(GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16))


def _gemma2():
    return Gemma2ForCausalLM(
        Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                     attn_logit_softcapping=20.0, final_logit_softcapping=15.0)
    )


def _gemma3():
    return Gemma3ForCausalLM(
        Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                         sliding_window_pattern=3)
    )


def _neox():
    c = dict(COMMON)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**c, rotary_pct=0.5, use_parallel_residual=True))


def _neox_sequential():
    return GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=False))


FAMILIES = {
    "llama": _llama,
    "llama_tied": _llama_tied,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt_neox": _neox,
    "gpt_neox_sequential": _neox_sequential,
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[name]().eval()
    # Random norm weights and biases, so that per-position norms and biases are really tested.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "layernorm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def byte_tokenizer():
    """A 97-token character-level tokenizer built offline, matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]  # 95 printable characters
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def save_tiny(name: str, path, seed: int = 0):
    """A tiny model of family `name` with the character tokenizer, saved as a HF folder."""
    model = make(name, seed)
    model.config.eos_token_id = 1
    model.config.pad_token_id = 1
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def bpe_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE trained offline on `corpus` (encodes any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
