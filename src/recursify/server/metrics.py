"""Prometheus metrics of the serving engine, fed by its thread after every step and read live when
scraped: queue depth, batch occupancy, step time, tokens per second, exit depth, time to first token.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..engine import LLMEngine, StepStats


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
