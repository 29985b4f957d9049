"""One engine step: a single batched pass of the shared block over every scheduled item.

Each item sits at its own loop b. For a cycle layout, layer k of the block is one shared slot
for every loop, so `model.layer_forward(edge + k, positions, h, rope, attend)` serves all rows at
once with per-row unrolled positions edge + b_i*K + k (each row gathers its own LoRA and norms).
Prelude/coda layers (middle_* strategies) run on the rows at loop 0 / the last loop.

At a loop boundary a decode row may exit: the shared head reads its residual stream, and a
confident row stops there. The keys/values of the depths it skipped are still needed by later
tokens, so they are filled from the exit hidden state (CALM's state propagation): k/v
projections of the skipped positions, batched per shared slot, in the same step.

Rows are grouped by length: single tokens in one group, prefill chunks (padded to the longest)
in another, so a long chunk never pads every decode row to its length.

Every tensor a step builds is made on the model's device, from host-side bookkeeping (the items'
Python ints), so a step never reads a device tensor back to decide what to run. The one transfer
back to the host is the exit logits (`Emission.logits`), which exit tests and sampling read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .scheduler import WorkItem

EXIT_MODES = ("none", "confidence", "entropy", "oracle", "replay")


@dataclass
class ExitConfig:
    """When a decode token may leave before the last loop.

    none: always full depth. confidence: exit when the max softmax probability of the exit logits
    is >= threshold. entropy: exit when 1 - H(p)/log(V) >= threshold. oracle: run full depth and
    record the first loop whose argmax equals the full-depth argmax (the paper's upper bound;
    output is exactly the full-depth output, compute is not saved). replay: exit at the depths in
    each request's `exit_schedule` (e.g. recorded by an oracle pass), to measure what those exits
    would cost with state propagation.
    """

    mode: str = "none"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        if self.mode not in EXIT_MODES:
            raise ValueError(f"unknown exit mode {self.mode!r}; choose one of {', '.join(EXIT_MODES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit threshold must be in [0, 1], got {self.threshold}")


@dataclass
class Emission:
    """A row that produced its sequence's next token: logits (on the host) to sample from and its depth in loops."""

    item: WorkItem
    logits: torch.Tensor
    depth: int


def kv_projection(model, slot: int, position, h: torch.Tensor, rope: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE keys and values [B, H_kv, T, D] that layer `slot` at `position` would compute
    from residual stream h, without the rest of the layer (queries, attention, MLP).

    Uses the same projection as `RecursiveForCausalLM.layer_forward` (`project_qkv`); tests check
    it against the k/v that layer_forward hands to `attend`.
    """
    x = model._norm("attn_norm", h, model._norm_index(slot, position))
    cos, sin, _ = model.position_rope(position, rope)
    _, k, v = model.project_qkv(slot, position, x, cos, sin, queries=False)
    return k, v


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    """A LongTensor of host ints, made on `device` (one host-to-device copy)."""
    return torch.tensor(values, dtype=torch.long, device=device)


class _Group:
    """Rows of one forward call: per-row sequence slot and first cache index, valid tokens, masks.

    Everything is built on h's device; the sizes and valid (row, token) pairs come from the
    items, never from reading a device tensor back.
    """

    def __init__(self, items, h, rope, window):
        self.items, self.h, self.rope = items, h, rope
        device = h.device
        n, T = h.shape[0], h.shape[1]
        self.slots = _long([it.seq_slot for it in items], device)
        self.starts = _long([it.start for it in items], device)
        self._set_valid(device)
        self.S = max(it.start + it.length for it in items)
        t = torch.arange(T, device=device)
        q_idx = (self.starts.view(n, 1) + t.view(1, T)).view(n, 1, T, 1)
        k_idx = torch.arange(self.S, device=device).view(1, 1, 1, self.S)
        full = k_idx <= q_idx
        self.masks = {False: full, True: full & ((q_idx - k_idx) < window) if window else full}

    def _set_valid(self, device) -> None:
        """(row, token) index pairs of the non-padding tokens, in row-major order."""
        self.valid_rows = _long([i for i, it in enumerate(self.items) for _ in range(it.length)], device)
        self.valid_t = _long([t for it in self.items for t in range(it.length)], device)

    def subset(self, rows: list[int]) -> "_Group":
        g = object.__new__(_Group)
        idx = _long(rows, self.h.device)
        g.items = [self.items[i] for i in rows]
        g.slots, g.starts = self.slots[idx], self.starts[idx]
        g.h = self.h[idx]
        g.rope = {key: (c[idx], s[idx]) for key, (c, s) in self.rope.items()}
        g._set_valid(self.h.device)
        g.S = self.S
        g.masks = {key: m[idx] for key, m in self.masks.items()}
        return g


class ModelRunner:
    def __init__(self, model, cache: KVCache, exit_config: ExitConfig | None = None):
        self.model = model
        self.cache = cache
        self.exit = exit_config or ExitConfig()
        layout = model.layout
        L = layout.num_layers
        self.note = None
        if layout.loopable:
            self.num_loops = layout.num_loops
            self.loop_positions = [layout.loop_positions(b) for b in range(self.num_loops)]
            self.prelude = [0] if layout.edge else []
            self.coda = [L - 1] if layout.edge else []
        else:
            # No loop boundary to batch or exit at: every step runs all L positions (plain
            # continuous batching over the unrolled model).
            self.num_loops = 1
            self.loop_positions = [list(range(L))]
            self.prelude, self.coda = [], []
            self.note = (
                f"strategy {layout.strategy!r} has no loop boundaries: depth-wise batching and early exit are off, "
                "every step runs all positions"
            )
            if self.exit.mode != "none":
                self.exit = ExitConfig("none")
        self.slot_of = layout.slot_of_position
        self.block_slots = [self.slot_of[p] for p in self.loop_positions[0]]
        self.device = model.embed_tokens.weight.device
        if cache.k.device != self.device:
            raise ValueError(f"the KV cache is on {cache.k.device} but the model is on {self.device}")

    # ------------------------------------------------------------------ assembly
    def _group(self, items: list[WorkItem]) -> _Group:
        n, T = len(items), max(it.length for it in items)
        d = self.model.arch.hidden_size
        device = self.device
        h = torch.zeros(n, T, d, dtype=self.model.embed_tokens.weight.dtype, device=device)
        fresh = [i for i, it in enumerate(items) if it.loop == 0]
        if fresh:
            ids = _long([items[i].token_ids + [0] * (T - items[i].length) for i in fresh], device)
            h[_long(fresh, device)] = self.model.embed(ids)
        for i, it in enumerate(items):
            if it.loop > 0:
                h[i, : it.length] = it.hidden
        pos_ids = _long([it.start for it in items], device).view(n, 1) + torch.arange(T, device=device).view(1, T)
        rope = self.model.rope(h, pos_ids)
        return _Group(items, h, rope, self.model.arch.sliding_window)

    def _attend(self, g: _Group):
        cache = self.cache

        def attend(q, k, v, position, is_sliding):
            n = k.shape[0]
            pos = position
            if isinstance(position, int):
                pos = torch.full((n,), position, dtype=torch.long, device=k.device)
            rr, tt = g.valid_rows, g.valid_t
            cache.write(g.slots[rr], pos[rr], g.starts[rr] + tt, k[rr, :, tt], v[rr, :, tt])
            keys, values = cache.read(g.slots, pos, g.S)
            if isinstance(is_sliding, bool):
                mask = g.masks[is_sliding]
            else:
                mask = torch.where(is_sliding.view(-1, 1, 1, 1), g.masks[True], g.masks[False])
            return self._attention(q, keys, values, mask)

        return attend

    def _attention(self, q, keys, values, mask):
        """SDPA over cached keys. For GQA the G query heads sharing a kv head are folded into
        the query length ([n, H_kv, G*T, D]) instead of copying every cached key G times."""
        a = self.model.arch
        if a.attn_softcap or a.num_heads == a.num_kv_heads:
            return self.model.attention_scores(q, keys, values, mask)
        n, H, T, D = q.shape
        G = H // a.num_kv_heads
        qg = q.reshape(n, a.num_kv_heads, G * T, D)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask.repeat(1, 1, G, 1), scale=a.scaling)
        return out.view(n, H, T, D)

    def _layer(self, g: _Group, positions: list[int]) -> None:
        """Run one layer on every row of g; positions (one per row) must all map to one shared slot."""
        slot = self.slot_of[positions[0]]
        same = all(p == positions[0] for p in positions)
        pos = positions[0] if same else _long(positions, g.h.device)
        g.h = self.model.layer_forward(slot, pos, g.h, g.rope, self._attend(g))

    def _on_rows(self, g: _Group, rows: list[int], position: int) -> None:
        """A unique (prelude/coda) layer on a subset of rows."""
        if not rows:
            return
        if len(rows) == len(g.items):
            self._layer(g, [position] * len(rows))
            return
        sub = g.subset(rows)
        self._layer(sub, [position] * len(rows))
        g.h = g.h.index_copy(0, _long(rows, g.h.device), sub.h)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self, items: list[WorkItem]) -> tuple[list[Emission], list[WorkItem]]:
        """Advance every item by one loop. Returns (emitted tokens' logits, items now complete)."""
        groups = [
            self._group(part)
            for part in ([it for it in items if it.length == 1], [it for it in items if it.length > 1])
            if part
        ]
        last = self.num_loops - 1
        for g in groups:
            for p in self.prelude:
                self._on_rows(g, [i for i, it in enumerate(g.items) if it.loop == 0], p)
        for k in range(len(self.loop_positions[0])):
            for g in groups:
                self._layer(g, [self.loop_positions[it.loop][k] for it in g.items])
        for g in groups:
            for p in self.coda:
                self._on_rows(g, [i for i, it in enumerate(g.items) if it.loop == last], p)

        emissions: list[Emission] = []
        completed: list[WorkItem] = []
        mode = self.exit.mode
        for g in groups:
            need = [
                i for i, it in enumerate(g.items)
                if (it.loop == last and it.produces_token) or (it.loop < last and it.is_decode and mode != "none")
            ]
            logits = {}
            if need:
                rows = _long(need, g.h.device)
                last_t = _long([g.items[i].length - 1 for i in need], g.h.device)
                # The step's one device-to-host copy: exit tests and sampling read these on the host.
                logits = dict(zip(need, self.model.exit_logits(g.h[rows, last_t]).float().cpu()))
            exited = []
            for i, it in enumerate(g.items):
                if it.loop == last:
                    completed.append(it)
                    if it.produces_token:
                        emissions.append(Emission(it, logits[i], self._final_depth(it, logits[i])))
                elif i in logits and self._exits(it, logits[i]):
                    completed.append(it)
                    exited.append(i)
                    emissions.append(Emission(it, logits[i], it.loop + 1))
                else:
                    it.hidden = g.h[i, : it.length]
                    it.loop += 1
            if exited:
                self._propagate(g, exited)
        return emissions, completed

    def _final_depth(self, item: WorkItem, logits: torch.Tensor) -> int:
        if self.exit.mode == "oracle":
            final = int(logits.argmax())
            for b, a in enumerate(item.loop_argmax):
                if a == final:
                    return b + 1
        return self.num_loops

    def _exits(self, item: WorkItem, logits: torch.Tensor) -> bool:
        mode = self.exit.mode
        if mode == "oracle":
            item.loop_argmax.append(int(logits.argmax()))
            return False
        if mode == "replay":
            schedule = item.request.exit_schedule or []
            n = len(item.request.output_token_ids)
            return n < len(schedule) and item.loop + 1 >= schedule[n]
        p = torch.softmax(logits, dim=-1)
        if mode == "confidence":
            return float(p.max()) >= self.exit.threshold
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return 1.0 - entropy / math.log(p.numel()) >= self.exit.threshold

    def _propagate(self, g: _Group, rows: list[int]) -> None:
        """Fill the KV entries of the positions each exited row skipped, from its exit state."""
        by_slot: dict[int, tuple[list[int], list[int]]] = {}
        for i in rows:
            skipped = [p for b in range(g.items[i].loop + 1, self.num_loops) for p in self.loop_positions[b]]
            for p in skipped + self.coda:
                rs, ps = by_slot.setdefault(self.slot_of[p], ([], []))
                rs.append(i)
                ps.append(p)
        for slot, (rs, ps) in by_slot.items():
            r, p = _long(rs, g.h.device), _long(ps, g.h.device)
            rope = {key: (c[r], s[r]) for key, (c, s) in g.rope.items()}
            k, v = kv_projection(self.model, slot, p, g.h[r, :1], rope)
            self.cache.write(g.slots[r], p, g.starts[r], k[:, :, 0], v[:, :, 0])
