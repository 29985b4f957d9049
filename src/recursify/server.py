"""OpenAI-compatible HTTP server over the serving engine.

The server only translates HTTP: it validates a request, tokenizes it, hands it to an
`AsyncLLMEngine` (whose thread runs the forward passes) and turns the engine's outputs back into
OpenAI responses, streamed as server-sent events when asked. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: bad input is 400, a full queue 429 and a
draining server 503 (both with Retry-After), so stock clients (`openai`) react correctly.

    serve("runs/rec2", port=8000, max_batch=8, exit_threshold=0.9)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import AsyncLLMEngine, EngineStoppedError, ExitConfig, LLMEngine, ParamError, QueueFullError, SamplingParams, StepStats

log = logging.getLogger("recursify.server")


class ClientGone(Exception):
    """The client hung up before its (non-streamed) answer was ready."""


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.retry_after = (
            status, message, type_, param, code, retry_after
        )

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------------------- validation
def _field(body: dict, name: str, kind: str, default: Any = None, required: bool = False) -> Any:
    """body[name] checked against a JSON kind: int, number, bool, str, str_or_list, object."""
    if name not in body or body[name] is None:
        if required:
            raise bad(f"'{name}' is required", name)
        return default
    v = body[name]
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "str_or_list": isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "object": isinstance(v, dict),
    }[kind]
    if not ok:
        what = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string",
                "str_or_list": "a string or a list of strings", "object": "an object"}[kind]
        raise bad(f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


def _sampling(body: dict, default_max_tokens: int, max_tokens_key: str = "max_tokens") -> SamplingParams:
    max_tokens = _field(body, max_tokens_key, "int", None)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = _field(body, "max_tokens", "int", None)
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise bad("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, "number", 0) != 0:
            raise bad(f"'{name}' is not supported (only 0)", name)
    if body.get("logprobs") not in (None, False, 0):
        raise bad("'logprobs' is not supported", "logprobs")
    if _field(body, "echo", "bool", False):
        raise bad("'echo' is not supported", "echo")
    stop = _field(body, "stop", "str_or_list", [])
    try:
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=_field(body, "temperature", "number", 1.0),
            top_p=_field(body, "top_p", "number", 1.0),
            top_k=_field(body, "top_k", "int", 0),
            seed=_field(body, "seed", "int", None),
            stop=[stop] if isinstance(stop, str) else stop,
            ignore_eos=_field(body, "ignore_eos", "bool", False),
        )
    except ParamError as e:
        raise bad(str(e), max_tokens_key if e.param == "max_tokens" else e.param) from None


def _prompt_ids(tokenizer, engine: LLMEngine, body: dict) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' must not be empty", "prompt")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        try:
            return engine.encode(prompt) if prompt else []
        except ParamError as e:
            raise bad(str(e), "prompt") from None
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("only one prompt per request is supported", "prompt")
    raise bad("'prompt' must be a string, a list of token ids, or a list with one of those", "prompt")


def _chat_ids(tokenizer, body: dict) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role' string", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages[{i}].role {m['role']!r} is not a valid role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content parts must be text parts", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise bad("this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise arbitrary errors for unsupported roles/orders
        raise bad(f"the chat template rejected these messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}", "messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics fed by the engine thread (per step) and read live at scrape time."""

    def __init__(self, engine: LLMEngine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.engine = engine
        self._window: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        Gauge("recursify_queue_depth", "Requests waiting for a KV-cache slot", registry=r).set_function(
            lambda: len(engine.scheduler.waiting))
        Gauge("recursify_running_requests", "Requests holding a KV-cache slot", registry=r).set_function(
            lambda: len(engine.scheduler.running))
        Gauge("recursify_kv_cache_free_slots", "Free KV-cache sequence slots", registry=r).set_function(
            lambda: engine.cache.num_free)
        Gauge("recursify_max_batch", "KV-cache sequence slots (most rows in a step)", registry=r).set(engine.max_batch)
        Gauge("recursify_num_loops", "Loops of the shared block", registry=r).set(engine.num_loops)
        Gauge("recursify_tokens_per_second", "Generated tokens per second over the last 10 s", registry=r).set_function(
            self.tokens_per_second)
        self.occupancy = Gauge("recursify_batch_occupancy", "Rows in the last step / max batch", registry=r)
        self.step_seconds = Histogram("recursify_step_seconds", "Wall time of one engine step", registry=r,
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.generated = Counter("recursify_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("recursify_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.exit_depth = Histogram("recursify_exit_depth_loops", "Loops each generated token ran before it exited",
                                    registry=r, buckets=tuple(range(1, engine.num_loops + 1)))
        self.requests = Counter("recursify_requests", "Requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("recursify_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def on_step(self, s: StepStats) -> None:
        now = time.monotonic()
        self.occupancy.set(s.rows / max(1, s.max_batch))
        self.step_seconds.observe(s.seconds)
        self.generated.inc(s.emitted)
        for d in s.exit_depths:
            self.exit_depth.observe(d)
        for out in s.finished:
            self.prompt_tokens.inc(out.prompt_tokens)
            self.requests.labels(outcome=out.finish_reason or "unknown").inc()
            if out.first_token_time is not None:
                self.ttft.observe(out.first_token_time - out.arrival_time)
        with self._lock:
            self._window.append((now, s.emitted))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - 10:
            self._window.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._window) / 10.0


# ---------------------------------------------------------------------------- app
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
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        log.info("engine started: %s, %d loops, max batch %d, context %d, exit %s",
                 model_name, core.num_loops, core.max_batch, core.max_model_len, core.runner.exit.mode)
        try:
            yield
        finally:
            # uvicorn has already let in-flight connections finish (graceful shutdown); now
            # stop taking work and let anything left complete before the thread stops.
            state["draining"] = True
            await asyncio.to_thread(aengine.shutdown, True, drain_timeout)

    app = FastAPI(title="recursify", lifespan=lifespan)
    app.state.engine = aengine
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return bad(f"invalid request: {exc.errors()[0].get('msg', 'bad input') if exc.errors() else 'bad input'}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("'model' must be a string", "model")
        if model not in (None, model_name):
            raise APIError(400, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        _field(body, "stream", "bool", False)
        so = _field(body, "stream_options", "object", {})
        _field(so, "include_usage", "bool", False)
        return body

    def submit(ids: list[int], params: SamplingParams, param_prompt: str) -> tuple[str, Any]:
        if state["draining"]:
            raise APIError(503, "the server is shutting down", "server_error", retry_after=5)
        try:
            core.check_length(len(ids), params.max_tokens)
            return aengine.submit(ids, params, loop=asyncio.get_running_loop())
        except ParamError as e:
            raise bad(str(e), param_prompt if e.param == "prompt" else e.param) from None
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", retry_after=1) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), "server_error", retry_after=5) from None

    async def collect(request: Request, rid: str, stream) -> Any:
        """Wait for the final output; a client that hangs up aborts its request."""

        async def watch():
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    aengine.abort(rid)
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

    def usage(out) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": n, "total_tokens": out.prompt_tokens + n}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def events(rid: str, stream, chunk, include_usage: bool, first=None):
        """SSE body; when the client disconnects Starlette cancels this generator, which aborts."""
        done = False
        try:
            if first is not None:
                yield sse(first)
            while not done:
                try:
                    out = await stream.aget()
                except RuntimeError as e:
                    yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
                    break
                done = out.finished
                if out.delta_text or done:
                    yield sse(chunk(out.delta_text, out.finish_reason if done else None))
                if done and include_usage:
                    c = chunk("", None)
                    c["choices"], c["usage"] = [], usage(out)
                    yield sse(c)
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                aengine.abort(rid)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if state["draining"] or not aengine.running:
            return APIError(503, "draining" if state["draining"] else "engine not running", "server_error", retry_after=5).response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(time.time()), "owned_by": "recursify",
            "max_model_len": core.max_model_len, "num_loops": core.num_loops,
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        ids = _prompt_ids(tokenizer, core, body)
        if not ids:
            raise bad("'prompt' must not be empty", "prompt")
        params = _sampling(body, default_max_tokens=16)
        rid, stream = submit(ids, params, "prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(rid, stream, chunk, include), media_type="text/event-stream")
        out = await collect(request, rid, stream)
        if out is None:
            return Response(status_code=499)  # nobody is listening any more
        result = chunk(out.text, out.finish_reason)
        result["usage"] = usage(out)
        return result

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        ids = _chat_ids(tokenizer, body)
        room = max(1, core.max_model_len - len(ids))
        params = _sampling(body, default_max_tokens=room, max_tokens_key="max_completion_tokens"
                           if "max_completion_tokens" in body else "max_tokens")
        rid, stream = submit(ids, params, "messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish, role=False):
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(rid, stream, chunk, include, first=chunk("", None, role=True)),
                                     media_type="text/event-stream")
        out = await collect(request, rid, stream)
        if out is None:
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": usage(out)}

    return app


# ---------------------------------------------------------------------------- entry point
def load_for_serving(checkpoint: str):
    """(RecursiveForCausalLM, tokenizer) from a recursify checkpoint, a Hugging Face causal-LM
    folder (served as its exact num_loops=1 conversion) or a bundled model name.

    Raises ValueError with one line, before any weights are read, when it is none of those.
    """
    import recursify as rf
    from .hub import BUNDLED, ModelLoadError, load_config

    def one_line(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__

    path = Path(checkpoint)
    if checkpoint not in BUNDLED:
        if not path.is_dir():
            raise ValueError(f"{checkpoint}: not a directory; serve needs a recursify checkpoint or a Hugging Face causal-LM folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"{checkpoint}: no config.json, so not a recursify checkpoint or a Hugging Face causal-LM folder")
    try:
        config = load_config(checkpoint)
    except ModelLoadError as e:
        raise ValueError(one_line(e)) from None
    try:
        if getattr(config, "model_type", None) == "recursify":
            model, tokenizer = rf.load_pretrained(checkpoint)
        else:
            rf.families.detect_family(config)  # unsupported architectures fail here, cheaply
            source, tokenizer = rf.load_pretrained(checkpoint)
            model = rf.convert(source, rf.RecursionConfig(num_loops=1), progress=False)
    except (ModelLoadError, ValueError, OSError) as e:
        raise ValueError(f"{checkpoint}: {one_line(e)}") from None
    return model, tokenizer


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
) -> None:
    """Load a checkpoint and serve it until SIGINT/SIGTERM (which drain in-flight requests).

    exit_threshold enables confidence-based early exit (max softmax probability >= threshold);
    exit_mode picks another rule ("entropy", "oracle"). `threads` sets torch's intra-op threads.
    """
    import torch
    import uvicorn

    if exit_threshold is not None and not 0.0 <= exit_threshold <= 1.0:
        raise ValueError(f"exit_threshold must be in [0, 1], got {exit_threshold}")
    exit_cfg = ExitConfig(exit_mode or ("confidence" if exit_threshold is not None else "none"),
                          0.9 if exit_threshold is None else exit_threshold)
    model, tokenizer = load_for_serving(checkpoint)
    if threads:
        torch.set_num_threads(threads)
    engine = LLMEngine(model, tokenizer, max_batch=max_batch, max_model_len=max_model_len,
                       kv_cache_bytes=kv_cache_bytes, exit=exit_cfg, max_queue=max_queue)
    name = model_name or Path(checkpoint).name or str(checkpoint)
    app = create_app(engine, name, tokenizer, drain_timeout=drain_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout))


__all__ = ["APIError", "Metrics", "create_app", "load_for_serving", "serve"]
