"""One engine step: a single batched pass of the shared block over every scheduled item.

Each item sits at its own loop b. For a cycle layout, layer k of the block is one shared slot
for every loop, so `model.layer_forward(edge + k, positions, h, rope, attend)` serves all rows at
once with per-row unrolled positions edge + b_i*K + k (each row gathers its own LoRA and norms).
Prelude/coda layers (middle_* strategies) run on the rows at loop 0 / the last loop.

At a loop boundary a decode row may exit, as the exit policy (exit_policy.py) decides: from the
shared head's logits (confidence, entropy) or from its residual stream alone (saturation). The
keys/values of the depths it skipped are still needed by later tokens, so they are filled from
the exit hidden state (CALM's state propagation): k/v projections of the skipped positions,
batched per shared slot, in the same step.

Rows are grouped by length: single tokens in one group, prefill chunks (padded to the longest)
in another, so a long chunk never pads every decode row to its length.

Every tensor a step builds is made on the model's device, from host-side bookkeeping (the items'
Python ints), so a step never reads a device tensor back to decide what to run. The one transfer
back to the host is the emitted rows' logits (`Emission.logits`), which sampling reads, besides the
exit decisions themselves (one boolean per row offered an exit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .exit_policy import ExitConfig, ExitPolicy
from .kv_cache import KVCache
from .scheduler import WorkItem

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
            if self.exit.checks:
                self.exit = ExitConfig("none")
        self.policy = ExitPolicy(self.exit)
        self.measure = False  # synchronize a GPU around exit decisions so their timing is exact
        self.exit_seconds = 0.0  # time spent deciding exits (head included for head modes)
        self.exit_checks = 0  # rows offered an exit
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
            if self.policy.needs_previous:  # each row's state entering this loop: the previous loop end
                g.previous = g.h[_long(list(range(len(g.items))), g.h.device), self._last_t(g.items)]
        for k in range(len(self.loop_positions[0])):
            for g in groups:
                self._layer(g, [self.loop_positions[it.loop][k] for it in g.items])
        for g in groups:
            for p in self.coda:
                self._on_rows(g, [i for i, it in enumerate(g.items) if it.loop == last], p)

        emissions: list[Emission] = []
        completed: list[WorkItem] = []
        for g in groups:
            final = [i for i, it in enumerate(g.items) if it.loop == last and it.produces_token]
            offered = [i for i, it in enumerate(g.items) if it.loop < last and it.is_decode and self.exit.checks]
            exited, logits = self._decide(g, offered)
            emit = sorted(final + exited)
            if emit:
                missing = [i for i in emit if i not in logits]
                if missing:
                    rows = _long(missing, g.h.device)
                    logits.update(zip(missing, self.model.exit_logits(g.h[rows, self._last_t(g.items, missing)])))
                # The step's one device-to-host copy of logits: sampling reads them on the host.
                host = torch.stack([logits[i] for i in emit]).float().cpu()
                logits = dict(zip(emit, host))
            out = set(exited)
            for i, it in enumerate(g.items):
                if it.loop == last:
                    completed.append(it)
                    if it.produces_token:
                        emissions.append(Emission(it, logits[i], self.policy.final_depth(it, logits[i], self.num_loops)))
                elif i in out:
                    completed.append(it)
                    emissions.append(Emission(it, logits[i], it.loop + 1))
                else:
                    it.hidden = g.h[i, : it.length]
                    it.loop += 1
            if exited:
                self._propagate(g, exited)
        return emissions, completed

    def _last_t(self, items, rows=None) -> torch.Tensor:
        """Index of each row's last valid token (padding follows it), on the model's device."""
        rows = range(len(items)) if rows is None else rows
        return _long([items[i].length - 1 for i in rows], self.device)

    def _decide(self, g: _Group, offered: list[int]) -> tuple[list[int], dict]:
        """Rows (of `offered`) that exit now, and the exit logits the decision already computed
        (on the device). Timed into `exit_seconds` / `exit_checks` (the policy's cost)."""
        if not offered:
            return [], {}
        if self.measure and g.h.device.type == "cuda":
            torch.cuda.synchronize(g.h.device)
        t0 = time.perf_counter()
        rows = _long(offered, g.h.device)
        hidden = g.h[rows, self._last_t(g.items, offered)]
        previous = g.previous[rows] if self.policy.needs_previous else None
        logits = self.model.exit_logits(hidden) if self.policy.uses_head else None
        decisions = self.policy.decide([g.items[i] for i in offered], hidden, previous, logits)
        self.exit_seconds += time.perf_counter() - t0
        self.exit_checks += len(offered)
        exited = [i for i, d in zip(offered, decisions) if d]
        if logits is None:
            return exited, {}
        return exited, {i: logits[j] for j, i in enumerate(offered) if decisions[j]}

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
