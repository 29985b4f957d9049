"""Which work runs in the next step.

Every running sequence has at most one work item in flight: a prefill chunk or the one token it
just sampled. An item advances ONE loop of the shared block per step, so a batch mixes items at
different loops b (continuous depth-wise batching). A token that exits early (or finishes its
last loop) ends its item at once; the sequence's next token starts at loop 0 in the next step,
so exits turn directly into fewer rows of work rather than idle padding.

Admission is by free KV-cache sequence slots: a waiting request starts only when a slot frees,
and the waiting queue itself is bounded (QueueFullError, which the server maps to 429).

The scheduler owns every state change, as in vLLM: `schedule` describes the step to the runner
as plain rows (batch.Batch), and `update_from_output` is the one place where the runner's answer
becomes state: loops advance, tokens are sampled and appended, stop and length rules end
requests, and their slots go back.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .batch import Batch, Row, RunnerOutput
from .exit_policy import forced_depth
from .kv_cache import SlotAllocator
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

    def row(self) -> Row:
        """This step's description of the item for the runner (a snapshot: nothing shared to mutate)."""
        is_decode = self.is_decode
        return Row(self.request.request_id, self.seq_slot, self.start, tuple(self.token_ids), self.loop,
                   hidden=self.hidden, is_decode=is_decode, emits=self.produces_token,
                   exit_after=forced_depth(self.request) if is_decode else None,
                   loop_argmax=tuple(self.loop_argmax), params=self.request.params)


class Scheduler:
    """Admission, batching and every serving state change. `tokenizer`, `eos_ids` and
    `max_model_len` are the stop and length rules `update_from_output` applies."""

    def __init__(self, slots: SlotAllocator, max_num_batched_tokens: int = 512, prefill_chunk: int = 256,
                 max_waiting: int = 256, *, tokenizer=None, eos_ids=(), max_model_len: int | None = None):
        self.slots = slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._scheduled: tuple[Batch, list[WorkItem]] | None = None  # the step in flight
        self._finished: list[str] = []  # ended since the last schedule(): the runner drops their state

    def add(self, req: Request) -> None:
        # Requests that a free slot will take at the next step do not count as queued.
        if len(self.waiting) >= self.max_waiting + self.slots.num_free:
            raise QueueFullError(f"the request queue is full ({self.max_waiting} waiting); retry later")
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.slots.num_free:
            req = self.waiting.popleft()
            req.seq_slot = self.slots.allocate()
            req.status = Status.RUNNING
            req.num_computed = 0
            req.work = None
            self.running.append(req)

    def schedule(self) -> Batch:
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
        batch = Batch(tuple(it.row() for it in items), finished=tuple(self._finished))
        self._finished = []
        self._scheduled = (batch, items)
        return batch

    def update_from_output(self, batch: Batch, output: RunnerOutput) -> list[tuple[Request, int]]:
        """Apply one step's outputs: advance the items that go on a loop, complete the others,
        sample and append emitted tokens, end requests by the stop/length rules (freeing their
        slots). Returns (request, exit depth) of each token appended, in batch order."""
        scheduled, items = self._scheduled or (None, [])
        if scheduled is not batch or len(output.rows) != len(items):
            raise RuntimeError("update_from_output got a batch or output this scheduler did not schedule")
        self._scheduled = None
        emitted = []
        for item, out in zip(items, output.rows):
            req = item.request
            if req.finished:  # aborted while the forward ran
                continue
            if out.argmax is not None:
                item.loop_argmax.append(out.argmax)
            if not out.done:
                item.hidden, item.loop = out.hidden, item.loop + 1
                continue
            req.num_computed = item.start + item.length
            req.work = None
            if out.token is not None:
                self._append(req, out.token, out.depth)
                emitted.append((req, out.depth))
        return emitted

    def _append(self, req: Request, token: int, depth: int) -> None:
        now = time.monotonic()
        req.output_token_ids.append(token)
        req.exit_depths.append(depth)
        if req.first_token_time is None:
            req.first_token_time = now
        stopped = req.update_text(self.tokenizer)
        if stopped or (token in self.eos_ids and not req.params.ignore_eos):
            self.finish(req, "stop")
        elif len(req.output_token_ids) >= req.params.max_tokens or (
                self.max_model_len is not None and req.num_tokens >= self.max_model_len):
            self.finish(req, "length")

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
            self.slots.free(req.seq_slot)
            req.seq_slot = None
        req.work = None
        self._finished.append(req.request_id)
        req.finish(reason)
