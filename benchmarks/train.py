"""Training benchmark: KD-step throughput/memory, and quality after a fixed token budget.

1. Throughput: tokens/s and peak memory of one KD step (teacher forward without grad, student
   forward + loss + backward + AdamW) for the recursive SmolLM2-135M at 2 loops r=64 and 5 loops
   r=168 (both 75 % of the parameters), done by recursify's loss code, each with the LoRA merged
   into the dense weight (the default for many tokens) and kept beside it; against the same KD
   step in a plain loop over a teacher-sized Hugging Face student (a copy of the teacher). On CPU
   (and CUDA when there is one).
2. Quality: held-out perplexity of the 2-loop recursive model with r=0 and r=64, and of the
   parameter-matched truncated model (the teacher's first K=15 layers + its head), before and
   after the same KD token budget, each trained by `recursify.train.trainer.train`.

    python benchmarks/train.py --tokens 20000 --out benchmarks/results/train.json

CPU peak memory is the process's peak RSS (VmHWM, reset through /proc/self/clear_refs before the
measured steps); "step peak" is that peak minus the resting RSS just before, i.e. what the steps
themselves allocate (activations, logits, gradients) on top of the loaded models and optimizer.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Memory probes
# ------------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def memory_now(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _status_mb("VmRSS")


def memory_peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _status_mb("VmHWM")


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------


def measure(steps: dict, tokens_per_step: int, device: str, warmup: int, repeats: int) -> dict[str, dict]:
    """Time the step functions *interleaved* (A, B, A, B, ...) and keep each one's median, so that
    load from other processes on a shared machine hits every variant alike; then the peak memory
    of one more step of each, from a reset peak."""
    for fn in steps.values():
        for _ in range(warmup):  # also creates the AdamW state
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, fn in steps.items():
        gc.collect()
        resting = memory_now(device)
        reset_peak(device)
        fn()
        peak = memory_peak(device)
        dt = sorted(times[name])[len(times[name]) // 2]
        out[name] = {"tokens_per_s": tokens_per_step / dt, "step_s": dt, "step_times_s": times[name],
                     "peak_mb": peak, "step_peak_mb": peak - resting}
    return out


def throughput(teacher, device: str, args) -> list[dict]:
    """The recursify KD step (Distiller + chunked losses) against a plain HF KD loop, same batch."""
    from contextlib import nullcontext
    from unittest.mock import patch

    import recursify as rf
    from recursify.lora import DepthwiseLoRA
    from recursify.train.losses import LossConfig
    from recursify.train.trainer import Distiller

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def recursive_step(recursion, merge: bool):
        """A KD step of a recursive student; merge=False keeps each LoRA beside its shared weight
        (two thin matmuls) even where the dense W + B A is cheaper (`DepthwiseLoRA.merge_pays`)."""
        student = rf.convert(teacher.cpu(), recursion, progress=False)
        rec = Distiller(student.to(device).train(), LossConfig(alpha=1.0))
        opt = torch.optim.AdamW(rec.parameters(), lr=1e-5)

        def step():
            t = teacher_logits()
            with amp, (nullcontext() if merge else patch.object(DepthwiseLoRA, "merge_pays", lambda self, x: False)):
                loss = rec(ids, t)["loss"]
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, student

    hf = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    teacher = teacher.to(device)

    def teacher_logits():
        with torch.no_grad(), amp:
            return teacher(input_ids=ids, use_cache=False).logits

    def plain_step():  # logits materialised, one KL over [B, T, V]
        t = teacher_logits()
        with amp:
            s = hf(input_ids=ids, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                        reduction="sum") / (s.shape[0] * s.shape[1])
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    two, five = rf.RecursionConfig(num_loops=2, lora_rank=64), rf.RecursionConfig(num_loops=5, lora_rank=168)
    names = {"recursify 2-loop r=64": recursive_step(two, True),
             "recursify 2-loop r=64, adapter beside W": recursive_step(two, False),
             "recursify 5-loop r=168": recursive_step(five, True),
             "recursify 5-loop r=168, adapter beside W": recursive_step(five, False),
             "plain HF loop, teacher-sized student": (plain_step, hf)}
    res = measure({n: fn for n, (fn, _) in names.items()}, ids.numel(), device, args.warmup, args.steps)
    rows = [{"device": device, "model": n, "params_m": _params(m), **res[n]} for n, (_, m) in names.items()]
    del names, hf, hf_opt
    gc.collect()
    teacher.cpu()
    return rows


def _params(model) -> float:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n / 1e6


# ------------------------------------------------------------------------------------------------
# Quality after a token budget
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_ppl(model, heldout, eval_tokens: int, batch: int) -> float:
    n = min(len(heldout), max(1, eval_tokens // heldout.seq_len))
    total, count = 0.0, 0
    for i in range(0, n, batch):
        ids = torch.stack([heldout[j]["input_ids"] for j in range(i, min(n, i + batch))])
        logits = model(input_ids=ids, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def quality(teacher, tok, args, work: Path) -> tuple[list[dict], float]:
    import recursify as rf
    from recursify.conversion.baselines import truncated
    from recursify.data import DataConfig, build_datasets
    from recursify.train.trainer import TrainConfig, train

    k = teacher.config.num_hidden_layers // 2
    variants = {
        "recursive 2-loop r=0": lambda: rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=0), progress=False),
        "recursive 2-loop r=64": lambda: rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=64), progress=False),
        f"truncated first {k} layers": lambda: truncated(teacher, k),
    }
    _, heldout = build_datasets(DataConfig(sources=args.data, heldout_sources=args.heldout, seq_len=args.seq_len,
                                           max_tokens=args.tokens, cache_dir=args.cache_dir), tok)
    teacher_ppl = heldout_ppl(teacher, heldout, args.eval_tokens, args.batch_size)
    rows = []
    for name, build in variants.items():
        folder = work / name.replace(" ", "_").replace("=", "")
        model = build()
        params = _params(model)
        model.save_pretrained(folder / "student")
        tok.save_pretrained(folder / "student")
        del model
        gc.collect()
        print(f"[quality] {name}: training on {args.tokens} tokens", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = train(TrainConfig(
            student=str(folder / "student"), teacher=args.teacher, data=args.data, heldout=args.heldout,
            cache_dir=args.cache_dir, out=str(folder / "run"), max_tokens=args.tokens, seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, alpha=1.0, eval_every=0,
            eval_tokens=args.eval_tokens, save_every=0, keep_last=1, progress=args.progress, seed=0))
        wall = time.perf_counter() - t0
        evals = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
        rows.append({"model": name, "params_m": params, "tokens": result["tokens"], "ppl_before": evals[0]["ppl"],
                     "ppl_after": evals[-1]["ppl"], "exit_ppl_after": evals[-1]["exit_ppl"],
                     "train_tokens_per_s": result.get("tokens_per_s"), "wall_s": wall})
    return rows, teacher_ppl


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=20_000, help="KD token budget of each quality run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the throughput measurement")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each variant (interleaved; the median is reported)")
    p.add_argument("--data", nargs="+", default=[str(ROOT / "corpus/python-docs/train")])
    p.add_argument("--heldout", nargs="+", default=[str(ROOT / "corpus/python-docs/heldout")])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train.json"))
    args = p.parse_args(argv)

    import transformers
    from rich.console import Console
    from rich.table import Table

    import recursify as rf

    transformers.logging.disable_progress_bar()
    console = Console()
    teacher, tok = rf.load_pretrained(args.teacher)
    report = {
        "teacher": args.teacher, "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": args.tokens,
        "lr": args.lr, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
        or platform.machine(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if not args.skip_throughput:
        rows = []
        for device in args.devices:
            rows += throughput(teacher, device, args)
        report["throughput"] = rows
        table = Table(title=f"KD step, batch {args.batch_size} x {args.seq_len} tokens, fp32 student "
                            f"({'bf16 autocast on cuda' if 'cuda' in args.devices else 'CPU'})")
        for col in ("device", "model", "params", "tokens/s", "s/step", "peak MB", "step peak MB"):
            table.add_column(col, justify="left" if col in ("device", "model") else "right")
        for r in rows:
            table.add_row(r["device"], r["model"], f"{r['params_m']:.1f}M", f"{r['tokens_per_s']:.0f}",
                          f"{r['step_s']:.2f}", f"{r['peak_mb']:.0f}", f"{r['step_peak_mb']:.0f}")
        console.print(table)
    if not args.skip_quality:
        with tempfile.TemporaryDirectory(prefix="recursify-train-bench-") as work:
            rows, teacher_ppl = quality(teacher, tok, args, Path(work))
        report["quality"] = rows
        report["teacher_heldout_ppl"] = teacher_ppl
        table = Table(title=f"held-out perplexity after {args.tokens} KD tokens (teacher: {teacher_ppl:.1f})")
        for col in ("model", "params", "ppl before", "ppl after", "per-exit ppl after", "train tok/s"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            exits = " / ".join(f"{x:.1f}" for x in r["exit_ppl_after"]) if len(r["exit_ppl_after"]) > 1 else "-"
            table.add_row(r["model"], f"{r['params_m']:.1f}M", f"{r['ppl_before']:.4g}", f"{r['ppl_after']:.1f}", exits,
                          f"{r['train_tokens_per_s'] or 0:.0f}")
        console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
