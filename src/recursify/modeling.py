"""The recursive decoder: K shared layers looped over L unrolled positions.

Every unrolled position p keeps its own identity: its depth index (for LoRA and norm gathers),
its attention type (full or sliding, as layer p of the source), and its own KV-cache slot
(`layer_idx = p`). Rows of one batch may sit at different positions of one shared slot
(`position` is then `RowPositions`): the serving engine's depth-wise batching relies on it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import Layout, RecursiveConfig
from .families import arch_from_config, family_by_name, hf_config_from_dict, rotary_embedding
from .layer_math import apply_norm, causal_masks, rotate, scaled_attention
from .lora import DepthwiseDiagonal, DepthwiseLoRA
from .util.positions import RowPositions

# An unrolled position: one int for the whole batch, or one per row (RowPositions: host ints that
# decide what runs, plus their device copy for gathers). A LongTensor is accepted and read once.
Position = int | RowPositions | torch.Tensor
# attend(q, k, v, position, is_sliding) -> attention output [batch, heads, seq, head_dim]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Position, torch.Tensor | bool], torch.Tensor]


# transformers renamed the cache argument and output field from `past_key_values` to `cache`
# (5.24); the model accepts both names and returns the cache under the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


REMOTE_CODE = {
    "configuration_recursify": "# Loaded via auto_map; needs `pip install recursify`.\nfrom recursify.config import RecursiveConfig  # noqa: F401\n",
    "modeling_recursify": "# Loaded via auto_map; needs `pip install recursify`.\nfrom recursify.modeling import RecursiveForCausalLM  # noqa: F401\n",
}


@dataclass
class RecursiveCausalLMOutput(CausalLMOutputWithPast):
    """`loop_hidden_states[b]` is the residual stream at the end of loop b (before the final norm);
    `position_hidden_states[p]` the residual stream after unrolled position p."""

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    position_hidden_states: tuple[torch.Tensor, ...] | None = None


class SharedLayer(nn.Module):
    """The linear weights that every position mapped to one slot loops through."""

    def __init__(self, arch, family):
        super().__init__()
        self.linears = nn.ModuleDict()
        for name in family.linears:
            d_in, d_out = arch.linear_shape(name)
            # Biases are per-position (see RecursiveForCausalLM.bias), like norms.
            self.linears[name] = nn.Linear(d_in, d_out, bias=False)


def resolve_rank(rank, d_in: int, d_out: int) -> int:
    return min(d_in, d_out) if rank == "full" else int(rank)


def lora_targets(family, recursion) -> list[str]:
    targets = list(recursion.lora_targets or family.linears)
    unknown = [t for t in targets + list(recursion.rank_pattern or {}) if t not in family.linears]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {', '.join(unknown)} for the {family.name} family; "
            f"valid: {', '.join(family.linears)}"
        )
    return targets


class RecursiveForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RecursiveConfig
    base_model_prefix = "recursive"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_cache_class = True
    _no_split_modules = ["SharedLayer"]
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: RecursiveConfig):
        super().__init__(config)
        self.family = family_by_name(config.family)
        self.source_config = hf_config_from_dict(config.base_config)
        self.arch = a = arch_from_config(self.family, self.source_config)
        self.recursion = config.recursion_config()
        self.layout = Layout.build(a.num_layers, self.recursion)
        L = a.num_layers

        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.slots = nn.ModuleList(SharedLayer(a, self.family) for _ in range(self.layout.num_slots))

        self.norm_names = [n for n in self.family.norms if n not in ("q_norm", "k_norm") or a.qk_norm]
        num_norms = self.layout.num_slots if self.recursion.share_norms else L
        layernorm = self.family.norm_kind == "layernorm"
        self.norm_weight = nn.ParameterDict(
            {n: nn.Parameter(torch.ones(num_norms, a.norm_dim(n))) for n in self.norm_names}
        )
        self.norm_bias = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(num_norms, a.norm_dim(n))) for n in self.norm_names} if layernorm else {}
        )
        # Linear biases (Qwen2 q/k/v, GPT-NeoX) are tiny vectors and live with the norms.
        self.bias = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(num_norms, a.linear_shape(n)[1])) for n in self.family.linears if a.linear_bias[n]}
        )
        self.final_norm_weight = nn.Parameter(torch.ones(a.hidden_size))
        self.final_norm_bias = nn.Parameter(torch.zeros(a.hidden_size)) if layernorm else None

        self.lora = nn.ModuleDict()
        self.diag = nn.ModuleDict()
        targets = lora_targets(self.family, self.recursion)
        widest = max(min(a.linear_shape(n)) for n in targets)
        if self.recursion.lora_rank != "full" and self.recursion.lora_rank > widest:
            raise ValueError(
                f"lora_rank={self.recursion.lora_rank} is larger than min(d_in, d_out)={widest} of every linear; "
                "use a smaller rank or 'full'"
            )
        for name in targets:
            d_in, d_out = a.linear_shape(name)
            # A rank beyond a narrow linear (GQA k/v) is full rank for that linear.
            r = (self.recursion.rank_pattern or {}).get(name, resolve_rank(self.recursion.lora_rank, d_in, d_out))
            r = min(r, min(d_in, d_out))
            if r > 0:
                self.lora[name] = DepthwiseLoRA(L, d_in, d_out, r)
            if self.recursion.variant == "residual":
                self.diag[name] = DepthwiseDiagonal(L, d_in, d_out)

        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.act = ACT2FN[a.act]
        self.checkpoint_positions = False  # training: recompute each position's activations in the backward
        # Kept outside the module tree: they are functions of the config, never weights, and so
        # survive meta-device loading and are never written to a checkpoint.
        with torch.device("cpu"):
            self.__dict__["_rotary"] = rotary_embedding(self.source_config)
        # Which positions attend through a sliding window: a static fact, kept as Python data so
        # that choosing a mask never reads a device tensor.
        self.sliding: tuple[bool, ...] = tuple(t == "sliding_attention" for t in a.layer_types)
        self.post_init()

    @property
    def rotary_emb(self):
        rot = self.__dict__["_rotary"]
        device = self.embed_tokens.weight.device
        if any(b.device != device for b in rot.buffers()):
            rot.to(device)
        return rot

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Hugging Face save, plus the two tiny `auto_map` modules that let stock tools
        (lm-eval, `AutoModelForCausalLM` with trust_remote_code=True) load the checkpoint in a
        process that never imported recursify. They import the installed package; no code is
        copied into the checkpoint."""
        super().save_pretrained(save_directory, *args, **kwargs)
        from pathlib import Path

        for module, line in REMOTE_CODE.items():
            (Path(save_directory) / f"{module}.py").write_text(line)

    # ------------------------------------------------------------------ building blocks
    def _norm(self, name: str, x: torch.Tensor, index: Position) -> torch.Tensor:
        w = self.norm_weight[name]
        b = self.norm_bias[name] if name in self.norm_bias else None
        if isinstance(index, int):
            w = w[index]
            b = b[index] if b is not None else None
        else:
            index = index.index
            shape = (index.shape[0],) + (1,) * (x.dim() - 2) + (w.shape[-1],)
            w = w.index_select(0, index).view(shape)
            b = b.index_select(0, index).view(shape) if b is not None else None
        return apply_norm(x, w, b, self.family.norm_kind, self.arch.eps)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return apply_norm(h, self.final_norm_weight, self.final_norm_bias, self.family.norm_kind, self.arch.eps)

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Prediction from a residual stream at any loop boundary: shared final norm + LM head."""
        logits = self.lm_head(self.final_norm(h))
        cap = self.arch.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _linear(self, slot: int, name: str, x: torch.Tensor, position: Position) -> torch.Tensor:
        weight = self.slots[slot].linears[name].weight
        lora = self.lora[name] if name in self.lora else None
        merge = lora is not None and isinstance(position, int) and lora.merge_pays(x)
        y = F.linear(x, lora.merged(weight, position) if merge else weight)
        if name in self.bias:
            index = self._norm_index(slot, position)
            b = self.bias[name]
            y = y + (b[index] if isinstance(index, int) else b.index_select(0, index.index).unsqueeze(1))
        if lora is not None and not merge:
            y = y + lora(x, position)
        if name in self.diag:
            y = y + self.diag[name](x, position)
        return y

    @contextmanager
    def adapter_views(self):
        """Every DepthwiseLoRA reads its per-position weights from one `unbind`'s views (an int index
        per use costs a full-size zero gradient each in the backward); dropped on exit."""
        modules = [m for m in self.lora.values() if m._views is None]  # nested blocks: the outer one owns them
        for m in modules:
            m.split_positions()
        try:
            yield
        finally:
            for m in modules:
                m.merge_positions()

    def _norm_index(self, slot: int, position: Position) -> Position:
        return slot if self.recursion.share_norms else position

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for full (False) and sliding (True) layers; they differ only in Gemma 3."""
        if self.arch.rope_per_layer_type:
            return {
                False: self.rotary_emb(h, position_ids, "full_attention"),
                True: self.rotary_emb(h, position_ids, "sliding_attention"),
            }
        cs = self.rotary_emb(h, position_ids)
        return {False: cs, True: cs}

    def position_rope(self, position: Position, rope: dict):
        """(cos, sin, is_sliding) for `position` (an int, or one per row), cos/sin shaped for heads."""
        if isinstance(position, int):
            is_sliding = self.sliding[position]
            cos, sin = rope[is_sliding]
        else:
            flags = [self.sliding[p] for p in position.values]
            if all(f == flags[0] for f in flags):  # one attention type for every row
                cos, sin = rope[flags[0]]
                return cos.unsqueeze(1), sin.unsqueeze(1), flags[0]
            is_sliding = torch.tensor(flags, dtype=torch.bool, device=rope[False][0].device)
            sel = is_sliding.view(-1, 1, 1)
            cos = torch.where(sel, rope[True][0], rope[False][0])
            sin = torch.where(sel, rope[True][1], rope[False][1])
        return cos.unsqueeze(1), sin.unsqueeze(1), is_sliding

    def project_qkv(self, slot: int, position: Position, x: torch.Tensor, cos, sin, queries: bool = True):
        """Post-RoPE q [B, H, T, D] (None unless `queries`) and k, v [B, H_kv, T, D] of slot's
        attention at `position`, from the attention-normed input x. The serving engine calls it
        alone (queries=False) to fill the KV entries of depths an early exit skipped."""
        a = self.arch
        bsz, seq, _ = x.shape
        ni = self._norm_index(slot, position)
        if self.family.fused_qkv:
            qkv = self._linear(slot, "qkv", x, position).view(bsz, seq, a.num_heads, 3 * a.head_dim)
            q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)
        else:
            q = self._linear(slot, "q", x, position).view(bsz, seq, a.num_heads, a.head_dim) if queries else None
            k = self._linear(slot, "k", x, position).view(bsz, seq, a.num_kv_heads, a.head_dim)
            v = self._linear(slot, "v", x, position).view(bsz, seq, a.num_kv_heads, a.head_dim)
            if a.qk_norm:
                k = self._norm("k_norm", k, ni)
                q = self._norm("q_norm", q, ni) if queries else None
            q = q.transpose(1, 2) if queries else None
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = rotate(q, cos, sin) if queries else None
        return q, rotate(k, cos, sin), v

    def kv_projection(self, slot: int, position: Position, h: torch.Tensor, rope: dict):
        """Post-RoPE k, v [B, H_kv, T, D] that layer `slot` at `position` would cache for residual
        stream h, without the rest of the layer: the serving engine fills the KV entries of the
        depths an early exit skipped with it (CALM's state propagation)."""
        position = RowPositions.of(position)
        x = self._norm("attn_norm", h, self._norm_index(slot, position))
        cos, sin, _ = self.position_rope(position, rope)
        _, k, v = self.project_qkv(slot, position, x, cos, sin, queries=False)
        return k, v

    def layer_forward(
        self,
        slot: int,
        position: Position,
        h: torch.Tensor,
        rope: dict,
        attend: AttendFn,
    ) -> torch.Tensor:
        """One decoder layer of shared slot `slot` at unrolled `position` (int or per row)."""
        a, fam = self.arch, self.family
        bsz, seq, _ = h.shape
        position = RowPositions.of(position)
        ni = self._norm_index(slot, position)
        cos, sin, is_sliding = self.position_rope(position, rope)

        def attention(x):
            q, k, v = self.project_qkv(slot, position, x, cos, sin)
            out = attend(q, k, v, position, is_sliding)
            out = out.transpose(1, 2).reshape(bsz, seq, a.num_heads * a.head_dim)
            return self._linear(slot, "o", out, position)

        def mlp(x):
            if "gate" in fam.linears:
                return self._linear(slot, "down", self.act(self._linear(slot, "gate", x, position)) * self._linear(slot, "up", x, position), position)
            return self._linear(slot, "down", self.act(self._linear(slot, "up", x, position)), position)

        if fam.residual == "parallel" and a.parallel_residual:
            attn_out = attention(self._norm("attn_norm", h, ni))
            return mlp(self._norm("mlp_norm", h, ni)) + attn_out + h
        if fam.residual == "sandwich":
            h = h + self._norm("post_attn_norm", attention(self._norm("attn_norm", h, ni)), ni)
            return h + self._norm("post_mlp_norm", mlp(self._norm("mlp_norm", h, ni)), ni)
        h = h + attention(self._norm("attn_norm", h, ni))
        return h + mlp(self._norm("mlp_norm", h, ni))

    def attention_scores(self, q, k, v, mask):
        """The one attention of the model and its executors (`layer_math.scaled_attention`)."""
        return scaled_attention(q, k, v, mask, self.arch)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight  # tied: a sparse gradient, added into the head's (train.head_loss)
        h = F.embedding(input_ids, w, sparse=w is self.lm_head.weight and w.requires_grad and torch.is_grad_enabled())
        return h * torch.tensor(self.arch.hidden_size**0.5, dtype=h.dtype) if self.family.scale_embeddings else h

    def build_masks(self, attention_mask, batch: int, seq: int, past: Position, device, total: int | None = None
                    ) -> dict[bool, torch.Tensor]:
        """Boolean masks [batch, 1, seq, total] for full and sliding layers (`causal_masks`); `past`
        may be one first cache index per row (the serving engine's rows)."""
        return causal_masks(attention_mask, batch, seq, past, device, self.arch.sliding_window, total)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        depth: torch.LongTensor | None = None,
        output_loop_states: bool = False,
        output_position_states: bool = False,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> RecursiveCausalLMOutput:
        """Causal LM forward over all unrolled positions.

        depth: optional LongTensor[batch] of loop counts (1..num_loops); row i then returns the
        early-exit logits after its own `depth[i]` loops. output_loop_states: also return the
        residual stream at every loop boundary (for early-exit losses). output_position_states: the
        residual stream after every unrolled position (for hidden-state distillation).
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        past_key_values = cache if cache is not None else past_key_values
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq, _ = h.shape
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=h.device).unsqueeze(0).expand(bsz, -1)
        rope = self.rope(h, position_ids)
        masks = self.build_masks(attention_mask, bsz, seq, past, h.device)
        kv = past_key_values if use_cache or past_key_values is not None else None

        def attend(q, k, v, position, is_sliding):
            if kv is not None:
                k, v = kv.update(k, v, position)
            return self.attention_scores(q, k, v, masks[is_sliding])

        layout = self.layout
        if (depth is not None or output_loop_states) and not layout.loopable:
            raise ValueError(f"strategy {layout.strategy!r} has no loop boundaries; early exits need a cycle strategy")

        loop_states, position_states = [], []
        exit_h = h if depth is not None else None
        with self.adapter_views():
            # The one loop schedule (the serving engine runs the same one, a loop per step).
            for step in layout.schedule():
                if self.checkpoint_positions and torch.is_grad_enabled() and kv is None:
                    h = checkpoint(self.layer_forward, step.slot, step.position, h, rope, attend, use_reentrant=False)
                else:
                    h = self.layer_forward(step.slot, step.position, h, rope, attend)
                if output_position_states:
                    position_states.append(h)
                if step.loop_end:
                    if output_loop_states:
                        loop_states.append(h)
                    if depth is not None and step.loop < layout.num_loops - 1:
                        exit_h = torch.where((depth == step.loop + 1).view(-1, 1, 1), h, exit_h)
        if depth is not None:
            h = torch.where((depth >= layout.num_loops).view(-1, 1, 1), h, exit_h)

        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.exit_logits(h[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return RecursiveCausalLMOutput(
            loss=loss,
            logits=logits,
            loop_hidden_states=tuple(loop_states) if output_loop_states else None,
            position_hidden_states=tuple(position_states) if output_position_states else None,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )

    # ------------------------------------------------------------------ accounting
    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters split into embedding / shared / LoRA / other (norms, diagonals, head)."""
        counts = {"embedding": 0, "shared": 0, "lora": 0, "other": 0}
        seen = set()
        for name, p in self.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("embed_tokens"):
                counts["embedding"] += p.numel()
            elif name.startswith("slots."):
                counts["shared"] += p.numel()
            elif name.startswith("lora."):
                counts["lora"] += p.numel()
            else:
                counts["other"] += p.numel()
        counts["total"] = sum(counts.values())
        return counts


AutoConfig.register("recursify", RecursiveConfig, exist_ok=True)
AutoModelForCausalLM.register(RecursiveConfig, RecursiveForCausalLM, exist_ok=True)
