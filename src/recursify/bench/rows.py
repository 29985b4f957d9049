"""One benchmark row: serve every request with its arrival time, through our engine or through
transformers' own continuous batching (row (b′), an engine we did not write)."""

from __future__ import annotations

import time
from collections import deque

from .workload import summarize


def run_row(model, tok, prompts, arrivals, args, max_batch, exit=None, threshold=None, schedules=None,
            exit_classifier=None):
    """Serve all requests with Poisson arrivals through `LLMEngine`; per-request tokens, exit
    depths, timings, the exit policy's measured cost and the threshold it used."""
    from ..engine import LLMEngine, SamplingParams, resolve_exit

    engine = LLMEngine(model, tok, max_batch=max_batch, max_model_len=args.prompt_len + args.output_len,
                       exit=resolve_exit(exit, threshold), max_queue=len(prompts) + 1, prefill_chunk=args.prompt_len,
                       max_num_batched_tokens=max(512, args.prompt_len), exit_classifier=exit_classifier)
    engine.runner.measure = True
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    engine.runner.exit_seconds, engine.runner.exit_checks = 0.0, 0
    steps = rows = 0
    pending = deque(range(len(prompts)))
    reqs = {}
    t0 = time.monotonic()
    while pending or engine.has_unfinished():
        now = time.monotonic() - t0
        while pending and arrivals[pending[0]] <= now:
            i = pending.popleft()
            r = engine.add_request(prompts[i], params, f"r{i}", exit_schedule=schedules[i] if schedules else None)
            r.arrival_time = t0 + arrivals[i]
            reqs[i] = r
        if engine.has_unfinished():
            n_rows = len(engine.scheduler.running) + min(len(engine.scheduler.waiting), engine.cache.num_free)
            engine.step()
            steps += 1
            rows += n_rows
        elif pending:
            time.sleep(min(0.005, max(0.0, arrivals[pending[0]] - now)))
    out = [reqs[i] for i in range(len(prompts))]
    depths = [d for r in out for d in r.exit_depths[1:]]  # the first token comes from the prompt pass
    runner = engine.runner
    return {
        "max_batch": engine.max_batch,
        "num_loops": engine.num_loops,
        **summarize([r.arrival_time for r in out], [r.first_token_time for r in out], [r.finish_time for r in out],
                    [r.output_token_ids for r in out], t0),
        "steps": steps, "mean_rows_per_step": rows / max(1, steps),
        "mean_exit_depth": sum(depths) / len(depths) if depths else float(engine.num_loops),
        "exit_checks": runner.exit_checks,
        "exit_threshold": runner.exit.threshold,
        "exit_ms_per_step": 1e3 * runner.exit_seconds / max(1, steps),
        "exit_us_per_check": 1e6 * runner.exit_seconds / runner.exit_checks if runner.exit_checks else 0.0,
        "exit_depths": [r.exit_depths for r in out],
    }


def run_speculative_row(model, prompts, args, k: int) -> dict:
    """Batch 1, requests back to back (no arrivals): self-speculative decoding with k drafts per
    round, or (k=0) plain full-depth decoding through the same code, the baseline it must beat."""
    from ..engine.speculative import SelfSpeculativeDecoder

    decoder = SelfSpeculativeDecoder(model, k=k)
    decoder.generate(prompts[0][:8], 2)  # warm-up
    starts, firsts, ends, tokens = [], [], [], []
    drafted = accepted = rounds = 0
    t0 = time.perf_counter()
    for p in prompts:
        start = time.perf_counter()
        out, stats = decoder.generate(p, args.output_len)
        starts.append(start)
        firsts.append(start + stats.first_token_seconds)
        ends.append(start + stats.seconds)
        tokens.append(out)
        drafted, accepted, rounds = drafted + stats.drafted, accepted + stats.accepted, rounds + stats.rounds
    return {
        "max_batch": 1,
        "num_loops": model.layout.num_loops,
        **summarize(starts, firsts, ends, tokens, t0),
        "mean_exit_depth": float(model.layout.num_loops),
        "draft_k": k,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_round": sum(len(t) - 1 for t in tokens) / rounds if rounds else None,
    }


def hf_batching_unavailable(model=None) -> str | None:
    """Why transformers' continuous batching cannot serve `model` here (None when it can)."""
    import transformers

    version = ".".join(transformers.__version__.split(".")[:2])
    try:
        from transformers import GenerationMixin
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return f"unavailable in transformers {version}"
    if not hasattr(GenerationMixin if model is None else model, "init_continuous_batching"):
        return f"unavailable in transformers {version}"
    return None


def run_hf_row(hf_model, prompts, arrivals, args, max_batch) -> dict:
    """The original Hugging Face model under transformers' continuous batching manager: same
    prompts at the same arrival times, greedy, fixed length, at most `max_batch` sequences'
    worth of KV blocks and rows per batch. Timestamps are the manager's own (perf_counter)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n_new = args.output_len
    page = 64
    per_seq = -(-(args.prompt_len + n_new) // page)
    gen = GenerationConfig(do_sample=False, max_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
    cb = ContinuousBatchingConfig(max_requests_per_batch=max_batch, page_size=page, num_blocks=max_batch * per_seq,
                                  max_batch_tokens=max(512, args.prompt_len), allow_block_sharing=False,
                                  use_cuda_graph=False)
    manager = hf_model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    try:
        manager.add_request(prompts[0][:8], request_id="warmup", max_new_tokens=2)
        if not _collect(manager, 1, 120.0):
            raise RuntimeError("transformers' continuous batching answered no warm-up request in 120 s")
        pending = deque(range(len(prompts)))
        t0 = time.perf_counter()
        results = {}
        while pending or len(results) < len(prompts):
            now = time.perf_counter() - t0
            while pending and arrivals[pending[0]] <= now:
                i = pending.popleft()
                manager.add_request(prompts[i], request_id=f"r{i}", max_new_tokens=n_new, record_timestamps=True)
            wait = max(0.0, arrivals[pending[0]] - now) if pending else 1.0
            results.update(_collect(manager, len(prompts) - len(results), min(wait, 1.0) or 0.001))
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
    finally:
        manager.stop(block=True, timeout=10)
    out = [results[f"r{i}"] for i in range(len(prompts))]
    for r in out:
        if r.error:
            raise RuntimeError(f"transformers' continuous batching failed a request: {r.error}")
    stamps = [r.timestamps for r in out]
    return {
        "max_batch": max_batch,
        "num_loops": 1,
        **summarize([t0 + a for a in arrivals], [s[0] for s in stamps], [s[-1] for s in stamps],
                    [list(r.generated_tokens) for r in out], t0),
        "mean_exit_depth": 1.0,
    }


def _collect(manager, until: int, timeout: float) -> dict:
    """Finished results from the manager, returning once `until` have come or `timeout` passed."""
    done = {}
    deadline = time.perf_counter() + timeout
    while len(done) < until:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        r = manager.get_result(timeout=left)
        if r is not None and r.is_finished():
            done[r.request_id] = r
    return done
