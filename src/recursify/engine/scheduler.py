"""Which work runs in the next step.

Every running sequence has at most one work item in flight: a prefill chunk or the one token it
just sampled. An item advances ONE loop of the shared block per step, so a batch mixes items at
different loops b (continuous depth-wise batching). A token that exits early (or finishes its
last loop) ends its item at once; the sequence's next token starts at loop 0 in the next step,
so exits turn directly into fewer rows of work rather than idle padding.

Admission is by free KV-cache sequence slots: a waiting request starts only when a slot frees,
and the waiting queue itself is bounded (QueueFullError, which the server maps to 429).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .request import Request, Status


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity; retry later."""


@dataclass
class WorkItem:
    """Tokens [start, start+T) of one sequence, travelling through the loops one step at a time."""

    request: Request
    token_ids: list[int]
    start: int
    loop: int = 0
    hidden: torch.Tensor | None = None  # residual stream [T, d] after the previous loop
    loop_argmax: list[int] = field(default_factory=list)  # oracle mode: intermediate predictions
    seq_slot: int = -1  # snapshot taken under the engine lock: an abort mid-step cannot change it

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """A generated token being fed back (only these may exit early; prompts run full depth)."""
        return self.start >= len(self.request.prompt_token_ids)

    @property
    def produces_token(self) -> bool:
        """Whether finishing this item yields the sequence's next token (its last known token is in it)."""
        return self.start + self.length == self.request.num_tokens


class Scheduler:
    def __init__(self, cache: KVCache, max_num_batched_tokens: int = 512, prefill_chunk: int = 256, max_waiting: int = 256):
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        # Requests that a free slot will take at the next step do not count as queued.
        if len(self.waiting) >= self.max_waiting + self.cache.num_free:
            raise QueueFullError(f"the request queue is full ({self.max_waiting} waiting); retry later")
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.cache.num_free:
            req = self.waiting.popleft()
            req.seq_slot = self.cache.allocate()
            req.status = Status.RUNNING
            req.num_computed = 0
            req.work = None
            self.running.append(req)

    def schedule(self) -> list[WorkItem]:
        """Admit what fits, then pick this step's items: decode tokens, in-flight prefill
        chunks, then new prefill chunks within the per-step token budget (chunked prefill)."""
        self._admit()
        items: list[WorkItem] = []
        budget = self.max_num_batched_tokens
        fresh: list[Request] = []
        for req in self.running:
            if req.work is None:
                if req.num_computed >= len(req.prompt_token_ids):
                    req.work = WorkItem(req, req.all_token_ids()[req.num_computed:], req.num_computed)
                else:
                    fresh.append(req)
                    continue
            items.append(req.work)
            budget -= req.work.length
        for req in fresh:
            n = min(len(req.prompt_token_ids) - req.num_computed, self.prefill_chunk, budget)
            if n <= 0:
                break
            req.work = WorkItem(req, req.prompt_token_ids[req.num_computed : req.num_computed + n], req.num_computed)
            items.append(req.work)
            budget -= n
        for it in items:
            it.seq_slot = it.request.seq_slot
        return items

    def complete(self, item: WorkItem) -> None:
        """The item went through all its loops (or exited): its tokens are now fully cached."""
        req = item.request
        req.num_computed = item.start + item.length
        req.work = None

    def finish(self, req: Request, reason: str) -> None:
        """End a request (done, stopped or aborted) and give its cache slot back at once."""
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        if req.seq_slot is not None:
            self.cache.free(req.seq_slot)
            req.seq_slot = None
        req.work = None
        req.finish(reason)
