"""recursify checkpoints served by vLLM: an out-of-tree model built from vLLM's own layers.

`pip install recursify` beside vLLM is all it takes: the `vllm.general_plugins` entry point calls
`register()`, which registers the architecture recursify writes in `config.json`
(`RecursiveForCausalLM`), so `vllm serve runs/x` and `vllm.LLM(model="runs/x")` load a recursify
checkpoint with no flag and no `trust_remote_code`.

What is shared stays shared: each slot's linears are one `QKVParallelLinear` /
`MergedColumnParallelLinear` / `RowParallelLinear` set, loaded and stored once, so the weights in
memory are the checkpoint's, not the unrolled model's. Each unrolled position has its own
`Attention` (its own KV cache, its sliding window), its own norms and biases, and its LoRA as fixed
low-rank factors applied inside the model (not vLLM's per-request LoRA), sharded like its base
layer for tensor parallelism: a column-parallel linear keeps A whole and holds its shard of B's
rows; a row-parallel linear holds its shard of A's columns and B whole, and its low-rank part is
added to the base layer's partial output before the one all-reduce of that layer.

vLLM runs every position for every token (full depth). Continuous depth-wise batching and early
exits are recursify's own engine's (`recursify serve`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..layer_math import apply_norm

log = logging.getLogger("recursify.vllm")

ARCHITECTURE = "RecursiveForCausalLM"  # config.json's `architectures`, as `convert` writes it
TESTED_VLLM = ("0.32",)  # vLLM releases the plugin is tested with (scripts/test_vllm.sh)
SUPPORTED = {"llama": "Llama, Mistral, Qwen2, Qwen3", "gemma1": "Gemma", "gemma2": "Gemma 2 and 3",
             "neox": "GPT-NeoX / Pythia"}


def register() -> None:
    """The `vllm.general_plugins` entry point: make recursify checkpoints loadable by vLLM. Called in
    every vLLM process; idempotent."""
    from transformers import AutoConfig

    import vllm
    from vllm import ModelRegistry

    from ..config import RecursiveConfig

    if not any(vllm.__version__.startswith(v) for v in TESTED_VLLM):
        log.warning("recursify's vLLM model is tested with vLLM %s; this is vLLM %s", ", ".join(TESTED_VLLM),
                    vllm.__version__)
    AutoConfig.register("recursify", RecursiveConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "recursify.integrations.vllm:RecursifyForCausalLM")


def _rows(total: int, rank: int, size: int) -> slice:
    """This rank's contiguous share of `total` rows."""
    n = total // size
    return slice(rank * n, (rank + 1) * n)


def neox_qkv_order(t: torch.Tensor, heads: int, dim: int = 0) -> torch.Tensor:
    """GPT-NeoX's fused rows [heads, 3, head_dim] reordered to [3, heads, head_dim] (all q, all k,
    all v), the layout `QKVParallelLinear` loads, along `dim` (0 for a weight, 1 for a stacked
    per-position bias or LoRA B)."""
    t = t.movedim(dim, 0)
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape[0], *rest).movedim(0, dim)


class RecursifyForCausalLM(nn.Module):
    """The recursive decoder in vLLM (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from transformers.activations import ACT2FN
        from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                      tensor_model_parallel_all_reduce)
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                       QKVParallelLinear, RowParallelLinear)
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        from ..config import Layout
        from ..families import arch_from_config, family_by_name, hf_config_from_dict
        from ..modeling import lora_targets, resolve_rank

        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.family = fam = family_by_name(config.family)
        if fam.name not in SUPPORTED:
            raise ValueError(f"recursify's vLLM model supports the {', '.join(SUPPORTED.values())} families, "
                             f"not {fam.name}; serve this checkpoint with `recursify serve`")
        self.recursion = rec = config.recursion_config()
        if rec.variant != "relaxed":
            raise ValueError(f"recursify's vLLM model serves relaxed recursive checkpoints, not {rec.variant!r} "
                             "ones; serve this checkpoint with `recursify serve`")
        source = hf_config_from_dict(config.base_config)
        self.arch = a = arch_from_config(fam, source)
        self.layout = Layout.build(a.num_layers, rec)
        self.tp_rank, self.tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self.all_reduce = tensor_model_parallel_all_reduce  # a row-parallel layer's one reduction
        tp, L = self.tp_size, a.num_layers
        if a.num_heads % tp or a.intermediate_size % tp:
            raise ValueError(f"tensor parallelism {tp} must divide the {a.num_heads} heads and the intermediate "
                             f"size {a.intermediate_size}")
        self.heads = a.num_heads // tp
        self.kv_heads = max(1, a.num_kv_heads // tp)
        self.kv_replicas = max(1, tp // a.num_kv_heads)
        hd = a.head_dim
        self.q_size, self.kv_size = self.heads * hd, self.kv_heads * hd
        self.inter = a.intermediate_size // tp
        fused = fam.fused_qkv  # GPT-NeoX: one qkv linear with its own LoRA
        gated = "gate" in fam.linears

        def slot(i: int) -> nn.Module:
            p = f"{prefix}slots.{i}"
            m = nn.Module()
            m.qkv = QKVParallelLinear(a.hidden_size, hd, a.num_heads, a.num_kv_heads, bias=False,
                                      quant_config=quant_config, prefix=f"{p}.qkv")
            m.o = RowParallelLinear(a.num_heads * hd, a.hidden_size, bias=False, reduce_results=False,
                                    quant_config=quant_config, prefix=f"{p}.o")
            if gated:
                m.gate_up = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{p}.gate_up")
            else:
                m.up = ColumnParallelLinear(a.hidden_size, a.intermediate_size, bias=False,
                                            quant_config=quant_config, prefix=f"{p}.up")
            m.down = RowParallelLinear(a.intermediate_size, a.hidden_size, bias=False, reduce_results=False,
                                       quant_config=quant_config, prefix=f"{p}.down")
            return m

        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, prefix=f"{prefix}embed_tokens")
        self.slots = nn.ModuleList(slot(i) for i in range(self.layout.num_slots))
        # Per position: its attention (own KV cache and window) and rotary; norms, biases, LoRA stacked.
        rope = getattr(source, "rope_parameters", None) or {}
        ropes = {}
        for kind in dict.fromkeys(a.layer_types):
            params = rope.get(kind, rope) if a.rope_per_layer_type else rope
            ropes[kind] = get_rope(hd, max_position=source.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=dict(params))
        self.rotary = nn.ModuleDict(ropes)
        self.attn = nn.ModuleList(
            Attention(self.heads, hd, a.scaling, num_kv_heads=self.kv_heads, cache_config=cache_config,
                      quant_config=quant_config, logits_soft_cap=a.attn_softcap,
                      per_layer_sliding_window=a.sliding_window if a.layer_types[p] == "sliding_attention" else None,
                      prefix=f"{prefix}positions.{p}.attn")
            for p in range(L))
        num_norms = self.layout.num_slots if rec.share_norms else L
        self.norm_names = [n for n in fam.norms if n not in ("q_norm", "k_norm") or a.qk_norm]
        layernorm = fam.norm_kind == "layernorm"
        self.norm_weight = nn.ParameterDict({n: nn.Parameter(torch.empty(num_norms, a.norm_dim(n)), requires_grad=False)
                                             for n in self.norm_names})
        self.norm_bias = nn.ParameterDict({n: nn.Parameter(torch.empty(num_norms, a.norm_dim(n)), requires_grad=False)
                                           for n in self.norm_names} if layernorm else {})
        self.bias = nn.ParameterDict({n: nn.Parameter(torch.empty(num_norms, self._local_out(n)), requires_grad=False)
                                      for n in fam.linears if a.linear_bias[n]})
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in lora_targets(fam, rec):
            d_in, d_out = a.linear_shape(name)
            r = min((rec.rank_pattern or {}).get(name, resolve_rank(rec.lora_rank, d_in, d_out)), d_in, d_out)
            if r > 0:
                self.lora_A[name] = nn.Parameter(torch.empty(L, r, self._local_in(name)), requires_grad=False)
                self.lora_B[name] = nn.Parameter(torch.empty(L, self._local_out(name), r), requires_grad=False)
        self.final_norm_weight = nn.Parameter(torch.empty(a.hidden_size), requires_grad=False)
        self.final_norm_bias = nn.Parameter(torch.empty(a.hidden_size), requires_grad=False) if layernorm else None
        if a.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, quant_config=quant_config,
                                          prefix=f"{prefix}lm_head")
        self.logits_processor = LogitsProcessor(a.vocab_size, soft_cap=a.final_softcap)
        self.act = ACT2FN[a.act]
        self.qkv_names = ("qkv",) if fused else ("q", "k", "v")
        self.mlp_in = ("gate", "up") if gated else ("up",)

    # ------------------------------------------------------------------ sharding
    def _column(self, name: str) -> bool:
        return name not in ("o", "down")

    def _local_out(self, name: str) -> int:
        """Output rows this rank holds of linear `name` (row-parallel outputs are whole)."""
        a = self.arch
        if not self._column(name):
            return a.hidden_size
        return {"q": self.q_size, "k": self.kv_size, "v": self.kv_size, "qkv": self.q_size + 2 * self.kv_size,
                "gate": self.inter, "up": self.inter}[name]

    def _local_in(self, name: str) -> int:
        a = self.arch
        if self._column(name):
            return a.hidden_size
        return self.q_size if name == "o" else self.inter

    def _shard_out(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows (dim 1 of a stacked [positions, out, ...] tensor) of a column-parallel output."""
        a, rank, tp = self.arch, self.tp_rank, self.tp_size
        if not self._column(name):
            return t
        hd = a.head_dim
        if name == "qkv":  # neox: already in [q; k; v] order, heads == kv heads
            q, k, v = t.split(a.num_heads * hd, dim=1)
            return torch.cat([x[:, _rows(x.shape[1], rank, tp)] for x in (q, k, v)], dim=1)
        if name in ("k", "v"):
            kv_rank = rank // self.kv_replicas
            return t[:, kv_rank * self.kv_size:(kv_rank + 1) * self.kv_size]
        return t[:, _rows(t.shape[1], rank, tp)]

    def _shard_in(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's columns (last dim) of a row-parallel input."""
        if self._column(name):
            return t
        return t[..., _rows(t.shape[-1], self.tp_rank, self.tp_size)]

    # ------------------------------------------------------------------ forward
    def _norm(self, name: str, x: torch.Tensor, index: int) -> torch.Tensor:
        b = self.norm_bias[name][index] if name in self.norm_bias else None
        return apply_norm(x, self.norm_weight[name][index], b, self.family.norm_kind, self.arch.eps)

    def _delta(self, name: str, x: torch.Tensor, p: int, ni: int) -> torch.Tensor | None:
        """LoRA output of linear `name` at position p plus its per-position bias (column outputs)."""
        out = None
        if name in self.lora_A:
            out = (x @ self.lora_A[name][p].t()) @ self.lora_B[name][p].t()
        if name in self.bias and self._column(name):
            out = self.bias[name][ni] if out is None else out + self.bias[name][ni]
        return out

    def _row(self, layer, name: str, x: torch.Tensor, p: int, ni: int) -> torch.Tensor:
        """A row-parallel linear plus its LoRA, reduced once across the tensor-parallel group."""
        out, _ = layer(x)
        if name in self.lora_A:  # this rank's columns of A: a partial sum like the base layer's
            out = out + (x @ self.lora_A[name][p].t()) @ self.lora_B[name][p].t()
        if self.tp_size > 1:
            out = self.all_reduce(out)
        if name in self.bias:
            out = out + self.bias[name][ni]
        return out

    def _attention(self, slot, p: int, ni: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        a = self.arch
        qkv, _ = slot.qkv(x)
        deltas = [self._delta(n, x, p, ni) for n in self.qkv_names]
        if any(d is not None for d in deltas):
            sizes = [self._local_out(n) for n in self.qkv_names]
            qkv = qkv + torch.cat([d if d is not None else qkv.new_zeros(x.shape[0], s) for d, s in zip(deltas, sizes)], -1)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if a.qk_norm:
            t = x.shape[0]
            q = self._norm("q_norm", q.reshape(t, self.heads, a.head_dim), ni).reshape(t, -1)
            k = self._norm("k_norm", k.reshape(t, self.kv_heads, a.head_dim), ni).reshape(t, -1)
        q, k = self.rotary[a.layer_types[p]](positions, q, k)
        return self._row(slot.o, "o", self.attn[p](q, k, v), p, ni)

    def _mlp(self, slot, p: int, ni: int, x: torch.Tensor) -> torch.Tensor:
        y, _ = (slot.gate_up if len(self.mlp_in) == 2 else slot.up)(x)
        deltas = [self._delta(n, x, p, ni) for n in self.mlp_in]
        if any(d is not None for d in deltas):
            y = y + torch.cat([d if d is not None else y.new_zeros(x.shape[0], self.inter) for d in deltas], -1)
        h = self.act(y[..., :self.inter]) * y[..., self.inter:] if len(self.mlp_in) == 2 else self.act(y)
        return self._row(slot.down, "down", h, p, ni)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.family.scale_embeddings:
            h = h * torch.tensor(self.arch.hidden_size**0.5, dtype=h.dtype)
        return h

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        share = self.recursion.share_norms
        for step in self.layout.schedule():
            p, slot = step.position, self.slots[step.slot]
            ni = step.slot if share else p
            if self.family.residual == "parallel" and self.arch.parallel_residual:
                h = h + self._attention(slot, p, ni, self._norm("attn_norm", h, ni), positions) \
                    + self._mlp(slot, p, ni, self._norm("mlp_norm", h, ni))
            elif self.family.residual == "sandwich":
                h = h + self._norm("post_attn_norm", self._attention(slot, p, ni, self._norm("attn_norm", h, ni),
                                                                     positions), ni)
                h = h + self._norm("post_mlp_norm", self._mlp(slot, p, ni, self._norm("mlp_norm", h, ni)), ni)
            else:
                h = h + self._attention(slot, p, ni, self._norm("attn_norm", h, ni), positions)
                h = h + self._mlp(slot, p, ni, self._norm("mlp_norm", h, ni))
        return apply_norm(h, self.final_norm_weight, self.final_norm_bias, self.family.norm_kind, self.arch.eps)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Map a recursify checkpoint's tensors onto this rank's parameters; returns their names."""
        a, neox = self.arch, self.family.fused_qkv
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        into = {"q": ("qkv", "q"), "k": ("qkv", "k"), "v": ("qkv", "v"), "qkv": ("qkv", None), "o": ("o", None),
                "gate": ("gate_up", 0), "up": ("gate_up", 1) if "gate" in self.family.linears else ("up", None),
                "down": ("down", None)}
        for name, w in weights:
            parts = name.split(".")
            if parts[0] == "slots":  # slots.{s}.linears.{linear}.weight
                module, shard = into[parts[3]]
                if neox and parts[3] == "qkv":
                    w = neox_qkv_order(w, a.num_heads)
                target = f"slots.{parts[1]}.{module}.weight"
                param = params[target]
                param.weight_loader(param, w, shard) if shard is not None else param.weight_loader(param, w)
            elif parts[0] in ("embed_tokens", "lm_head"):
                if parts[0] == "lm_head" and a.tie_word_embeddings:
                    continue
                target = name
                params[target].weight_loader(params[target], w)
            elif parts[0] == "lora":  # lora.{linear}.lora_A / lora_B: [positions, r, in] / [positions, out, r]
                linear, which = parts[1], parts[2]
                if which == "lora_A":
                    w = self._shard_in(linear, w)
                else:
                    w = self._shard_out(linear, neox_qkv_order(w, a.num_heads, 1) if neox and linear == "qkv" else w)
                target = f"{which}.{linear}"
                params[target].data.copy_(w)
            elif parts[0] == "bias":  # bias.{linear}: [norms, out]
                linear = parts[1]
                w = neox_qkv_order(w, a.num_heads, 1) if neox and linear == "qkv" else w
                target = name
                params[target].data.copy_(self._shard_out(linear, w))
            elif parts[0] == "diag":
                raise ValueError("residual-variant checkpoints are not supported in vLLM; use `recursify serve`")
            else:  # norm_weight.*, norm_bias.*, final_norm_*
                target = name
                params[target].data.copy_(w)
            loaded.add(target)
        return loaded
