"""A KV cache allocated once, up front, inside a fixed memory budget.

Layout: keys and values are each one tensor [num_seq_slots, L_unrolled, H_kv, max_len, D]. Every
unrolled position keeps its own entry (loops never share keys), and each running sequence owns
one sequence slot for its whole life. Slot-granular allocation (rather than pages) keeps the
attention gather a single indexing op; the price is that a slot is sized for `max_len` tokens,
so the budget buys `budget // bytes_per_slot` concurrent sequences and no more. Nothing grows
after construction: when every slot is taken, new requests wait in the scheduler's queue.

Allocation is kept apart from the tensors, as in vLLM: `SlotAllocator` (which sequence owns which
slot) belongs to the scheduler, the tensors to the runner. The cache sizes both from one budget
and carries its allocator only so that `num_free` can be read for metrics.
"""

from __future__ import annotations

import torch


class CacheBudgetError(ValueError):
    """The memory budget cannot hold even one sequence of the requested length."""


class SlotAllocator:
    """Which sequence slots are free; pure bookkeeping on the host, no tensors."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free sequence slot, or None when the cache is full (the caller queues)."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"sequence slot {slot} is not allocated")
        self._free.append(slot)


class KVCache:
    def __init__(
        self,
        num_positions: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        max_seqs: int,
        budget_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        per_slot = self.bytes_per_slot(num_positions, num_kv_heads, head_dim, max_len, dtype)
        num_slots = max_seqs
        if budget_bytes is not None:
            num_slots = min(max_seqs, int(budget_bytes // per_slot))
            if num_slots < 1:
                raise CacheBudgetError(
                    f"KV cache budget of {budget_bytes / 2**20:.1f} MiB cannot hold one sequence of {max_len} tokens "
                    f"({per_slot / 2**20:.1f} MiB); raise the budget or lower max_model_len"
                )
        if num_slots < 1:
            raise CacheBudgetError("max_seqs must be at least 1")
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, num_positions, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = SlotAllocator(num_slots)

    @staticmethod
    def bytes_per_slot(num_positions, num_kv_heads, head_dim, max_len, dtype=torch.float32) -> int:
        itemsize = dtype.itemsize
        return 2 * num_positions * num_kv_heads * max_len * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def num_free(self) -> int:
        """Free sequence slots (read-only; the scheduler allocates through `slots`)."""
        return self.slots.num_free

    # ------------------------------------------------------------------ data movement
    def write(self, slots, positions, index, k, v) -> None:
        """Store k/v [N, H_kv, D] at (slots[i], positions[i], :, index[i]) for every i (all LongTensor[N])."""
        self.k[slots, positions, :, index] = k
        self.v[slots, positions, :, index] = v

    def read(self, slots, positions, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, H_kv, length, D] of each row's sequence at each row's position."""
        return self.k[slots, positions, :, :length], self.v[slots, positions, :, :length]
