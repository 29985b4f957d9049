"""The FastAPI app: one handler per route, each translating a request for the engine and the
engine's outputs back (:mod:`.protocol` knows the wire format), and `serve`, which starts it.

The handlers are module-level and find what they serve in ``app.state.served``; the engine
thread runs for the app's lifespan and drains in-flight requests at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import (AsyncLLMEngine, EngineStoppedError, LLMEngine, ParamError, QueueFullError, SamplingParams,
                      resolve_exit)
from .metrics import Metrics
from .protocol import (APIError, ClientGone, bad, chat_chunk, chat_completion, chat_ids, completion_chunk,
                       error_event, include_usage, parse_body, prompt_ids, sampling_params, sse, usage)

log = logging.getLogger("recursify.server")
router = APIRouter()


@dataclass
class Served:
    """What every route reads: the engine (its thread), the name and tokenizer it serves, metrics."""

    engine: AsyncLLMEngine
    model_name: str
    tokenizer: Any
    metrics: Metrics
    drain_timeout: float
    draining: bool = False

    @property
    def core(self) -> LLMEngine:
        return self.engine.engine

    def submit(self, ids: list[int], params: SamplingParams, param_prompt: str) -> tuple[str, Any]:
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", retry_after=5)
        try:
            self.core.check_length(len(ids), params.max_tokens)
            return self.engine.submit(ids, params, loop=asyncio.get_running_loop())
        except ParamError as e:
            raise bad(str(e), param_prompt if e.param == "prompt" else e.param) from None
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", retry_after=1) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), "server_error", retry_after=5) from None

    async def collect(self, request: Request, rid: str, stream) -> Any:
        """Wait for the final output; a client that hangs up aborts its request."""

        async def watch():
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    self.engine.abort(rid)
                    stream.put(ClientGone())
                    return

        watcher = asyncio.create_task(watch())
        try:
            while True:
                out = await stream.aget()
                if out.finished:
                    return out
        except ClientGone:
            return None
        except RuntimeError as e:
            raise APIError(500, str(e), "server_error") from None
        finally:
            watcher.cancel()

    async def events(self, rid: str, stream, chunk, with_usage: bool, first=None):
        """SSE body; when the client disconnects Starlette cancels this generator, which aborts."""
        done = False
        try:
            if first is not None:
                yield sse(first)
            while not done:
                try:
                    out = await stream.aget()
                except RuntimeError as e:
                    yield sse(error_event(str(e)))
                    break
                done = out.finished
                if out.delta_text or done:
                    yield sse(chunk(out.delta_text, out.finish_reason if done else None))
                if done and with_usage:
                    c = chunk("", None)
                    c["choices"], c["usage"] = [], usage(out)
                    yield sse(c)
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.engine.abort(rid)


def _served(request: Request) -> Served:
    return request.app.state.served


# ---------------------------------------------------------------------------- routes
@router.get("/health")
async def health(request: Request):
    s = _served(request)
    if s.draining or not s.engine.running:
        return APIError(503, "draining" if s.draining else "engine not running", "server_error", retry_after=5).response()
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(_served(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    s = _served(request)
    return {"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": int(time.time()), "owned_by": "recursify",
        "max_model_len": s.core.max_model_len, "num_loops": s.core.num_loops,
    }]}


@router.post("/v1/completions")
async def completions(request: Request):
    s = _served(request)
    body = parse_body(await request.body(), s.model_name)
    ids = prompt_ids(s.tokenizer, s.core, body)
    if not ids:
        raise bad("'prompt' must not be empty", "prompt")
    params = sampling_params(body, default_max_tokens=16)
    rid, stream = s.submit(ids, params, "prompt")
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text, finish):
        return completion_chunk(cid, created, s.model_name, text, finish)

    if body.get("stream"):
        return StreamingResponse(s.events(rid, stream, chunk, include_usage(body)), media_type="text/event-stream")
    out = await s.collect(request, rid, stream)
    if out is None:
        return Response(status_code=499)  # nobody is listening any more
    result = chunk(out.text, out.finish_reason)
    result["usage"] = usage(out)
    return result


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    s = _served(request)
    body = parse_body(await request.body(), s.model_name)
    ids = chat_ids(s.tokenizer, body)
    room = max(1, s.core.max_model_len - len(ids))
    params = sampling_params(body, default_max_tokens=room, max_tokens_key="max_completion_tokens"
                             if "max_completion_tokens" in body else "max_tokens")
    rid, stream = s.submit(ids, params, "messages")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text, finish, role=False):
        return chat_chunk(cid, created, s.model_name, text, finish, role)

    if body.get("stream"):
        return StreamingResponse(s.events(rid, stream, chunk, include_usage(body), first=chunk("", None, role=True)),
                                 media_type="text/event-stream")
    out = await s.collect(request, rid, stream)
    if out is None:
        return Response(status_code=499)
    return chat_completion(cid, created, s.model_name, out)


# ---------------------------------------------------------------------------- errors
async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError):
    return bad(f"invalid request: {exc.errors()[0].get('msg', 'bad input') if exc.errors() else 'bad input'}").response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind).response()


# ---------------------------------------------------------------------------- app and entry point
@asynccontextmanager
async def _lifespan(app: FastAPI):
    s: Served = app.state.served
    s.engine.start()
    core = s.core
    log.info("engine started: %s, %d loops, max batch %d, context %d, exit %s",
             s.model_name, core.num_loops, core.max_batch, core.max_model_len, core.runner.exit.mode)
    try:
        yield
    finally:
        # uvicorn has already let in-flight connections finish (graceful shutdown); now
        # stop taking work and let anything left complete before the thread stops.
        s.draining = True
        await asyncio.to_thread(s.engine.shutdown, True, s.drain_timeout)


def create_app(engine: LLMEngine | AsyncLLMEngine, model_name: str, tokenizer=None, drain_timeout: float = 60.0) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name`; the engine thread runs while the app does."""
    aengine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine)
    core = aengine.engine
    tokenizer = tokenizer if tokenizer is not None else core.tokenizer
    if tokenizer is None:
        raise ValueError("create_app needs a tokenizer (for prompts, chat templates and detokenization)")
    core.tokenizer = tokenizer
    metrics = Metrics(core)
    core.listeners.append(metrics.on_step)

    app = FastAPI(title="recursify", lifespan=_lifespan)
    app.state.served = Served(aengine, model_name, tokenizer, metrics, drain_timeout)
    app.state.engine = aengine
    app.state.metrics = metrics
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    return app


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    exit_threshold: float | None = None,
    *,
    exit_mode: str | None = None,
    model_name: str | None = None,
    max_model_len: int | None = None,
    kv_cache_bytes: int | None = None,
    max_queue: int = 64,
    threads: int | None = None,
    drain_timeout: float = 60.0,
    log_level: str = "info",
    device="auto",
    dtype="auto",
) -> None:
    """Load a checkpoint and serve it until SIGINT/SIGTERM (which drain in-flight requests).

    exit_threshold enables confidence-based early exit (max softmax probability >= threshold);
    exit_mode picks another rule ("entropy", "saturation", "oracle", or "classifier": the probe
    saved next to the checkpoint by `recursify exits fit`, at its calibrated threshold unless
    exit_threshold is given). `threads` sets torch's intra-op threads; `device`/`dtype` take what
    `--device`/`--dtype` take (auto: a GPU in bf16 if there is one, else the CPU in fp32).
    """
    import torch
    import uvicorn

    from ..hub import load_for_serving

    exit_cfg = resolve_exit(exit_mode, exit_threshold)  # raises ParamError (one line) before any loading
    classifier = None
    if exit_cfg.mode == "classifier":  # a missing probe file is one line before any weights are read
        from ..engine.exit_classifier import ExitClassifier

        classifier = ExitClassifier.load(checkpoint)
    model, tokenizer = load_for_serving(checkpoint, device=device, dtype=dtype)
    if threads:
        torch.set_num_threads(threads)
    engine = LLMEngine(model, tokenizer, max_batch=max_batch, max_model_len=max_model_len,
                       kv_cache_bytes=kv_cache_bytes, exit=exit_cfg, max_queue=max_queue, exit_classifier=classifier)
    name = model_name or Path(checkpoint).name or str(checkpoint)
    app = create_app(engine, name, tokenizer, drain_timeout=drain_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout))
