"""OpenAI-compatible HTTP server over the serving engine.

The server only translates HTTP: it validates a request, tokenizes it, hands it to an
`AsyncLLMEngine` (whose thread runs the forward passes) and turns the engine's outputs back into
OpenAI responses, streamed as server-sent events when asked. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: bad input is 400, a full queue 429 and a
draining server 503 (both with Retry-After), so stock clients (`openai`) react correctly.

`protocol` holds the wire format (validation, response shapes, `APIError`), `metrics` the
Prometheus metrics, `app` the routes, `create_app` and `serve`.

    serve("runs/rec2", port=8000, max_batch=8, exit_threshold=0.9)
"""

from .app import create_app, serve
from .metrics import Metrics
from .protocol import APIError

__all__ = ["APIError", "Metrics", "create_app", "serve"]
