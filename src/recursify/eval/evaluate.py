"""`recursify eval`: what a conversion cost, measured against its teacher.

Perplexity (strided sliding window), per-exit perplexity for every loop, KL and top-1 agreement
with the teacher, a LAMBADA-style cloze accuracy on held-out real text, parameters and peak
memory, and the paper's seven benchmarks through lm-evaluation-harness.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..util.device import resolve_placement

METRICS = ("ppl", "exits", "agreement", "cloze", "paper")


class EvalError(ValueError):
    """An evaluation request whose result would be meaningless."""


@dataclass
class EvalConfig:
    model: str  # a recursify checkpoint, an HF folder, a .gguf file or a bundled name
    data: list[str] = field(default_factory=list)  # held-out text (files, folders, jsonl, save_to_disk)
    teacher: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["ppl", "exits", "agreement"])
    train_data: list[str] = field(default_factory=list)  # to warn about train/held-out overlap
    seq_len: int = 512
    max_tokens: int = 16_384  # held-out tokens scored (perplexity, agreement)
    stride: int | None = None  # tokens between perplexity windows: None is half the context; the context
    # itself gives disjoint windows, as `recursify compress` and the trainer score
    cloze_items: int = 200
    limit: int | None = None  # items per lm-eval task
    batch_size: int = 4
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on a GPU that supports it, float32 on CPU


class ExitView(torch.nn.Module):
    """A recursive model seen as if it always exited after `loops` loops, for the generic metrics."""

    def __init__(self, model, loops: int):
        super().__init__()
        self.model, self.loops = model, loops
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        depth = torch.full((input_ids.shape[0],), self.loops, dtype=torch.long, device=input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, depth=depth, use_cache=False)


def parse_tasks(tasks: list[str] | str) -> tuple[list[str], list[str]]:
    """Split requested names into our metrics and lm-eval tasks; unknown names are an error."""
    from .harness import PAPER_TASKS

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    ours, bench = [], []
    for n in names:
        if n == "paper":
            bench.extend(name for name in PAPER_TASKS if name not in bench)
        elif n in METRICS:
            ours.append(n)
        elif n in PAPER_TASKS or n.removeprefix("recursify_") in PAPER_TASKS:
            bench.append(n.removeprefix("recursify_"))
        else:
            valid = ", ".join(list(METRICS) + sorted(PAPER_TASKS))
            raise EvalError(f"unknown task {n!r}; valid: {valid}")
    return ours, bench


def evaluate(cfg: EvalConfig, console=None) -> dict:
    import recursify as rf

    from ..data import DataConfig, build_datasets, iter_documents, overlap_report
    from ..hub import check_causal, vocabulary_mismatch
    from .harness import run_paper_tasks
    from .metrics import cloze_accuracy, count_parameters, peak_memory, perplexity, teacher_agreement

    ours, bench = parse_tasks(cfg.tasks)
    needs_data = any(t in ours for t in ("ppl", "exits", "agreement", "cloze"))
    if needs_data and not cfg.data:
        raise EvalError("these metrics need held-out text: pass --data")
    if "agreement" in ours and not cfg.teacher:
        raise EvalError("agreement needs --teacher")
    if cfg.stride is not None and not 1 <= cfg.stride <= cfg.seq_len:
        raise EvalError(f"--stride must be between 1 and --seq-len ({cfg.seq_len}), got {cfg.stride}")

    def status(msg):
        return console.status(msg) if console is not None else _null()

    where = resolve_placement(cfg.device, cfg.dtype)  # a DeviceError (one line) before any loading
    t0 = time.time()
    with status(f"loading {cfg.model}"):
        model, tok = rf.load_pretrained(cfg.model, device=where.device, dtype=where.dtype)
        check_causal(model, cfg.model)
    teacher = None
    if cfg.teacher:
        with status(f"loading teacher {cfg.teacher}"):
            teacher, teacher_tok = rf.load_pretrained(cfg.teacher, device=where.device, dtype=where.dtype)
            check_causal(teacher, cfg.teacher)
        problem = vocabulary_mismatch(model, tok, teacher, teacher_tok, name="model")
        if problem:
            raise EvalError(f"the teacher's tokenizer differs from the model's (the teacher {problem}): "
                            "KL and agreement would compare different vocabularies")
    result: dict = {"model": cfg.model, "teacher": cfg.teacher, "config": asdict(cfg)}
    result["params"] = count_parameters(model)
    result["params_non_embedding"] = count_parameters(model, exclude_embeddings=True)

    stream = None
    if needs_data:
        with status("tokenising held-out data"):
            heldout, _ = build_datasets(
                DataConfig(sources=cfg.data, seq_len=cfg.seq_len, heldout_fraction=0.0, max_tokens=cfg.max_tokens), tok
            )
        stream = torch.as_tensor(heldout.read_tokens(0, min(heldout.num_tokens, cfg.max_tokens)).astype("int64"))
        result["heldout_tokens"] = int(stream.numel())
        if cfg.train_data:
            train, _ = build_datasets(DataConfig(sources=cfg.train_data, seq_len=cfg.seq_len, heldout_fraction=0.0), tok)
            overlap = overlap_report(train, heldout)
            result["overlap_sequences"] = overlap
            if overlap:
                msg = f"warning: {overlap} held-out sequences also occur in the training data; perplexity is optimistic"
                (console.print(msg) if console else print(msg))

    context = min(cfg.seq_len, getattr(model.config, "max_position_embeddings", cfg.seq_len))
    stride = min(cfg.stride or context // 2, context)
    if "ppl" in ours:
        with status("perplexity"):
            result["ppl"] = perplexity(model, stream, context_len=context, stride=stride, batch_size=cfg.batch_size)
            if teacher is not None:
                result["teacher_ppl"] = perplexity(teacher, stream, context_len=context, stride=stride, batch_size=cfg.batch_size)
    is_recursive = isinstance(model, rf.RecursiveForCausalLM)
    if "exits" in ours and is_recursive and model.layout.loopable:
        result["exit_ppl"] = {}
        for b in range(1, model.layout.num_loops + 1):
            with status(f"perplexity at exit {b}"):
                r = perplexity(ExitView(model, b), stream, context_len=context, stride=stride, batch_size=cfg.batch_size)
            result["exit_ppl"][b] = r["ppl"]
            if teacher is not None:
                seqs = stream[: (stream.numel() // context) * context].view(-1, context)[:8]
                result.setdefault("exit_agreement", {})[b] = teacher_agreement(ExitView(model, b), teacher, seqs, cfg.batch_size)["top1_agreement"]
    if "agreement" in ours:
        seqs = stream[: (stream.numel() // context) * context].view(-1, context)
        with status("agreement with the teacher"):
            result["agreement"] = teacher_agreement(model, teacher, seqs, batch_size=cfg.batch_size)
    if "cloze" in ours:
        with status("cloze accuracy"):
            result["cloze"] = cloze_accuracy(model, tok, iter_documents(cfg.data), n=cfg.cloze_items, batch_size=cfg.batch_size)
    if bench:
        result["paper"] = run_paper_tasks(model, tasks=bench, tokenizer=tok, limit=cfg.limit, batch_size=cfg.batch_size,
                                           device=str(where.device))
        result["paper"].pop("raw", None)
    result["peak_memory"] = peak_memory()
    result["seconds"] = time.time() - t0
    return result


def format_result(result: dict):
    from rich.table import Table

    table = Table(title=f"recursify eval: {result['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{result['params'] / 1e6:.2f}M ({result['params_non_embedding'] / 1e6:.2f}M non-embedding)")
    if "ppl" in result:
        table.add_row("held-out perplexity", f"{result['ppl']['ppl']:.2f} ({result['ppl']['tokens']} tokens)")
    if "teacher_ppl" in result:
        table.add_row("teacher perplexity", f"{result['teacher_ppl']['ppl']:.2f}")
    for b, p in result.get("exit_ppl", {}).items():
        extra = f", top-1 agreement {result['exit_agreement'][b]:.3f}" if "exit_agreement" in result else ""
        table.add_row(f"exit after loop {b}", f"ppl {p:.2f}{extra}")
    if "agreement" in result:
        a = result["agreement"]
        table.add_row("KL(teacher‖model)", f"{a['kl']:.4f} nats/token")
        table.add_row("top-1 agreement", f"{a['top1_agreement']:.3f}")
    if "cloze" in result:
        table.add_row("cloze accuracy (last word)", f"{result['cloze']['acc']:.3f} (n={result['cloze']['n']})")
    if "paper" in result:
        for name, r in result["paper"]["tasks"].items():
            table.add_row(f"{name} ({r['metric']})", f"{100 * r['value']:.1f} (n={r['n']})")
        table.add_row("paper average", f"{100 * result['paper']['average']:.1f}")
    mem = result["peak_memory"]
    table.add_row("peak memory", f"{mem['rss_bytes'] / 2**30:.2f} GiB RSS" + (f", {mem['cuda_bytes'] / 2**30:.2f} GiB CUDA" if mem.get("cuda_bytes") else ""))
    table.add_row("seconds", f"{result['seconds']:.1f}")
    return table


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
