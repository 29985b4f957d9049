"""LLMEngine: requests in, tokens out, one scheduler + runner step at a time.

A step is schedule (the scheduler describes the batch), execute (the runner computes it and
answers with plain outputs), update (the scheduler applies them); only the scheduler changes state.

`LLMEngine` is synchronous and single-threaded: `add_request`, then call `step()` until
`has_unfinished()` is false (or use `generate` / `stream`). `AsyncLLMEngine` drives it from a
background thread for the HTTP server: submitting, aborting and reading results are safe from any
thread or event loop, while the forward passes never block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence


from ..modeling import RecursiveForCausalLM
from .kv_cache import KVCache
from .request import ParamError, Request, RequestOutput, SamplingParams
from .exit_classifier import FIT_HINT, ExitClassifier, ExitClassifierError
from .exit_policy import ExitConfig, resolve_exit
from .runner import ModelRunner
from .scheduler import Scheduler

log = logging.getLogger("recursify.engine")


@dataclass
class StepStats:
    """What one step did; listeners (the server's Prometheus metrics) receive one per step."""

    rows: int  # work items in the batch
    tokens: int  # token positions processed (prefill chunk tokens count each)
    emitted: int  # tokens produced
    exit_depths: list[int] = field(default_factory=list)  # loops used by each produced token
    waiting: int = 0
    running: int = 0
    max_batch: int = 0
    seconds: float = 0.0
    finished: list[RequestOutput] = field(default_factory=list)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return ids


def find_exit_classifier(source, model) -> ExitClassifier:
    """The classifier to serve: `source` if it is one, else loaded from the folder `source` names,
    else from the folder `model` was loaded from; ExitClassifierError (one line) if there is none."""
    if isinstance(source, ExitClassifier):
        return source
    folder = source or getattr(model, "name_or_path", None)
    if not folder or not Path(folder).is_dir():
        raise ExitClassifierError("exit mode 'classifier' needs an exit classifier: pass exit_classifier (a checkpoint "
                                  f"folder or an ExitClassifier) or load the model from its checkpoint folder; {FIT_HINT}")
    return ExitClassifier.load(folder)


class LLMEngine:
    """Continuous depth-wise batching over a `RecursiveForCausalLM`.

    max_batch: concurrent sequences (KV-cache sequence slots, also the most rows in a step).
    max_model_len: prompt + output tokens per sequence (each slot is sized for it).
    kv_cache_bytes: optional memory budget; it may lower the number of slots below max_batch.
    exit, exit_threshold: early exit at loop boundaries, an ExitConfig or a mode name and a
    threshold in (0, 1] (see exit_policy.resolve_exit; bad values raise ParamError at once).
    exit_classifier: for exit mode classifier, an ExitClassifier or the checkpoint folder holding
    one (default: the folder the model was loaded from); missing or mismatched, it raises a
    one-line ValueError here, before the KV cache is allocated.
    A vanilla model, `rf.convert(hf_model, RecursionConfig(num_loops=1))`, gives ordinary
    continuous batching: each step runs the whole depth.
    """

    def __init__(
        self,
        model: RecursiveForCausalLM,
        tokenizer=None,
        *,
        max_batch: int = 8,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        exit: ExitConfig | str | None = None,
        exit_threshold: float | None = None,
        max_num_batched_tokens: int = 512,
        prefill_chunk: int = 256,
        max_queue: int = 256,
        exit_classifier=None,
    ):
        if not isinstance(model, RecursiveForCausalLM):
            raise TypeError(
                f"LLMEngine serves RecursiveForCausalLM models, got {type(model).__name__}; "
                "wrap a Hugging Face model with rf.convert(model, rf.RecursionConfig(num_loops=1))"
            )
        exit = resolve_exit(exit, exit_threshold)
        classifier = None
        if exit.mode == "classifier" and model.layout.loopable and model.layout.num_loops > 1:
            classifier = find_exit_classifier(exit_classifier, model)
            classifier.check(model)
        self.model = model.eval()
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = int(max_model_len or min(limit, 2048))
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of {limit} tokens")
        a = model.arch
        param = model.embed_tokens.weight
        self.cache = KVCache(a.num_layers, a.num_kv_heads, a.head_dim, self.max_model_len, max_batch,
                             kv_cache_bytes, dtype=param.dtype, device=param.device)
        self.scheduler = Scheduler(self.cache.slots, max_num_batched_tokens, prefill_chunk, max_queue,
                                   tokenizer=tokenizer, eos_ids=eos_token_ids(model, tokenizer),
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(model, self.cache, exit, classifier)
        if self.runner.note:
            log.warning(self.runner.note)
        self.requests: dict[str, Request] = {}
        self.listeners: list = []  # callables receiving StepStats, called from the stepping thread
        self._lock = threading.RLock()  # guards scheduler state; never held during a forward

    @property
    def num_loops(self) -> int:
        return self.runner.num_loops

    @property
    def max_batch(self) -> int:
        return self.cache.num_slots

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a request (the scheduler's stop rule)."""
        return self.scheduler.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.scheduler.eos_ids = set(ids)

    @property
    def tokenizer(self):
        return self.scheduler.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.scheduler.tokenizer = tokenizer

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ParamError("prompt must not be empty", "prompt")
            if self.tokenizer is None:
                raise ParamError("text prompts need a tokenizer; pass token ids or give the engine a tokenizer", "prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = list(prompt)
        vocab = self.model.arch.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise ParamError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        return ids

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse what can never fit a sequence slot, with the numbers in the message."""
        n, ctx = num_prompt_tokens, self.max_model_len
        if n == 0:
            raise ParamError("prompt must not be empty", "prompt")
        if n >= ctx:
            raise ParamError(f"prompt is {n} tokens; the context is {ctx} tokens (prompt + completion)", "prompt")
        if n + max_tokens > ctx:
            raise ParamError(
                f"max_tokens={max_tokens} plus the {n}-token prompt exceeds the context of {ctx} tokens "
                f"(at most {ctx - n} here)",
                "max_tokens",
            )

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        exit_schedule: list[int] | None = None,
    ) -> Request:
        """Validate and queue a request. Raises ParamError (bad input) or QueueFullError."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_length(len(ids), params.max_tokens)
        req = Request(ids, params, request_id or "", exit_schedule=exit_schedule)
        with self._lock:
            if req.request_id in self.requests:
                raise ParamError(f"request id {req.request_id!r} is already in use", "request_id")
            self.scheduler.add(req)
            self.requests[req.request_id] = req
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its cache slot is free for the next step. False if unknown/finished."""
        with self._lock:
            req = self.requests.pop(request_id, None)
            if req is None or req.finished:
                return False
            self.scheduler.finish(req, "abort")
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One scheduler decision, one batched forward, one state update; outputs of requests that advanced."""
        t0 = time.perf_counter()
        with self._lock:
            batch = self.scheduler.schedule()
        if not batch.rows:
            return []
        output = self.runner.execute_model(batch)  # outside the lock: aborts may land meanwhile
        outputs: list[RequestOutput] = []
        stats = StepStats(rows=len(batch), tokens=batch.num_tokens, emitted=0)
        with self._lock:
            for req, depth in self.scheduler.update_from_output(batch, output):
                stats.emitted += 1
                stats.exit_depths.append(depth)
                out = RequestOutput.of(req)
                outputs.append(out)
                if req.finished:
                    self.requests.pop(req.request_id, None)
                    stats.finished.append(out)
            stats.waiting = len(self.scheduler.waiting)
            stats.running = len(self.scheduler.running)
        stats.max_batch = self.cache.num_slots
        stats.seconds = time.perf_counter() - t0
        for fn in self.listeners:
            fn(stats)
        return outputs

    # ------------------------------------------------------------------ conveniences
    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion together; final outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(reqs):
            if not self.has_unfinished():
                break
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final.get(r.request_id) or RequestOutput.of(r) for r in reqs]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Step the engine and yield this request's outputs as they come (other requests advance too)."""
        req = self.add_request(prompt, params)
        try:
            while not req.finished:
                for out in self.step():
                    if out.request_id == req.request_id:
                        yield out
        finally:
            if not req.finished:
                self.abort(req.request_id)


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class _Stream:
    """Outputs of one request, handed from the engine thread to an event loop or a thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.aq: asyncio.Queue | None = asyncio.Queue() if loop else None
        self.q: queue.Queue | None = None if loop else queue.Queue()

    def put(self, item) -> None:
        if self.loop is None:
            self.q.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.aq.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def aget(self):
        item = await self.aq.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def get(self, timeout: float | None = None):
        item = self.q.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncLLMEngine:
    """Runs `LLMEngine.step` in a background thread; requests stream back per request."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._ids = 0
        self._ids_lock = threading.Lock()
        self.errors = 0  # engine steps that raised (each aborts the requests in flight)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "AsyncLLMEngine":
        if not self.running:
            self._stop = self._draining = False
            self._thread = threading.Thread(target=self._loop, name="recursify-engine", daemon=True)
            self._thread.start()
        return self

    def _new_id(self) -> str:
        with self._ids_lock:
            self._ids += 1
            return f"req-{self._ids}-{time.monotonic_ns()}"

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> tuple[str, _Stream]:
        """Queue a request (thread-safe). Raises ParamError, QueueFullError or EngineStoppedError."""
        if self._draining or not self.running:
            raise EngineStoppedError("the server is shutting down" if self._draining else "the engine is not running")
        rid = request_id or self._new_id()
        stream = _Stream(loop)
        self._streams[rid] = stream  # before add_request: the engine thread may answer at once
        try:
            self.engine.add_request(prompt, params, rid)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._wake.set()
        return rid, stream

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async stream of this request's outputs; closing it early aborts the request."""
        rid, stream = self.submit(prompt, params, request_id, asyncio.get_running_loop())
        finished = False
        try:
            while not finished:
                out = await stream.aget()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            if not engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                self.errors += 1
                log.exception("engine step failed; aborting the requests in flight")
                for rid, stream in list(self._streams.items()):
                    stream.put(RuntimeError(f"engine error: {e}"))
                    self.abort(rid)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        self._streams.pop(out.request_id, None)

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the ones in flight finish (up to timeout)."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while drain and self.running and self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        for rid, stream in list(self._streams.items()):
            stream.put(EngineStoppedError("request aborted: the engine shut down"))
            self.abort(rid)
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)
