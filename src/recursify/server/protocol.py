"""The OpenAI wire format: request validation and response shapes, with no engine or HTTP state.

Every bad input becomes an `APIError` whose body is OpenAI's
{"error": {"message", "type", "param", "code"}}, so stock clients (`openai`) report it as such.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse

from ..engine import LLMEngine, ParamError, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")


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


# ---------------------------------------------------------------------------- requests
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


def parse_body(raw: bytes, model_name: str) -> dict:
    """The request's JSON object, with the fields every endpoint shares checked."""
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


def include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def sampling_params(body: dict, default_max_tokens: int, max_tokens_key: str = "max_tokens") -> SamplingParams:
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


def prompt_ids(tokenizer, engine: LLMEngine, body: dict) -> list[int]:
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


def chat_ids(tokenizer, body: dict) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role' string", "messages")
        if m["role"] not in ROLES:
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


# ---------------------------------------------------------------------------- responses
def usage(out) -> dict:
    n = len(out.token_ids)
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": n, "total_tokens": out.prompt_tokens + n}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def error_event(message: str) -> dict:
    """An error inside a stream whose 200 status has already been sent."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def completion_chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(cid: str, created: int, model: str, text: str, finish: str | None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def chat_completion(cid: str, created: int, model: str, out) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": usage(out)}
