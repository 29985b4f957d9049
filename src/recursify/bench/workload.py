"""The serving benchmark's workload and summary statistics, shared by every row.

Every row serves the same prompts at the same Poisson arrival times, so ratios between rows
measured in one run compare engines, not workloads.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def wiki_corpus() -> Path | None:
    """corpus/wiki/wiki.jsonl (scripts/fetch_corpora.sh) under the current folder, else the source checkout."""
    rel = Path("corpus", "wiki", "wiki.jsonl")
    parents = Path(__file__).resolve().parents  # src/recursify/bench/workload.py in a checkout
    roots = [Path.cwd()] + ([parents[3]] if len(parents) > 3 and (parents[3] / "pyproject.toml").exists() else [])
    return next((root / rel for root in roots if (root / rel).exists()), None)


def make_prompts(tok, n, length, seed):
    """Prompts of exactly `length` tokens cut from the wiki corpus (random ids without it)."""
    rng = random.Random(seed)
    corpus = wiki_corpus()
    prompts = []
    if corpus is not None:
        with corpus.open() as f:
            for line in f:
                ids = tok(json.loads(line)["text"])["input_ids"]
                if len(ids) >= length:
                    start = rng.randrange(0, len(ids) - length + 1)
                    prompts.append(ids[start : start + length])
                if len(prompts) >= n:
                    break
    lo = 1000 if tok.vocab_size > 2000 else 3  # skip the special tokens at the start of the vocabulary
    while len(prompts) < n:
        prompts.append([rng.randrange(lo, tok.vocab_size - 1) for _ in range(length)])
    return prompts


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds; rate=inf puts every request at 0."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    return arrivals


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def agreement(tokens, reference):
    """(token agreement, identical sequences) against the full-depth greedy outputs."""
    same = sum(a == b for x, y in zip(tokens, reference) for a, b in zip(x, y))
    total = sum(len(y) for y in reference)
    return same / total, sum(x == y for x, y in zip(tokens, reference)) / len(reference)


def summarize(arrival_times, first_times, finish_times, tokens, start: float) -> dict:
    """Throughput and latency percentiles from per-request timestamps (one clock, seconds)."""
    end = max(finish_times)
    n_tokens = sum(len(t) for t in tokens)
    ttft = [f - a for f, a in zip(first_times, arrival_times)]
    tpot = [(e - f) / (len(t) - 1) for f, e, t in zip(first_times, finish_times, tokens) if len(t) > 1]
    return {
        "output_tokens": n_tokens,
        "seconds": end - start,
        "output_tok_s": n_tokens / (end - start),
        "ttft_ms_p50": 1e3 * percentile(ttft, 50), "ttft_ms_p99": 1e3 * percentile(ttft, 99),
        "tpot_ms_p50": 1e3 * percentile(tpot, 50), "tpot_ms_p99": 1e3 * percentile(tpot, 99),
        "tokens": tokens,
    }
