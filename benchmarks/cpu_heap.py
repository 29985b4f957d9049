"""What the allocator settings of `recursify.cpu_heap` cost or buy a CPU training step.

Settings: `glibc` (the allocator's defaults), `keep` (`keep_freed_memory`: freed buffers are kept
and reused, `recursify train`'s default) and `return` (`return_freed_memory`: every buffer from
1 MiB up is unmapped when freed, what `compress` distils under so that its peak is what is alive).
The KD step `recursify compress` runs (teacher forward without grad, student forward + KL loss +
backward + fused AdamW, batch 4 x 256) on SmolLM2-135M's 75 % students, each model and allocator
setting in its own process (the peak memory of one would count for the other): the recursive student
(30 loops, the per-linear ranks `compress --time-budget 60m` chose) and the parameter-matched plain
model (20 of the 30 layers). Per step: wall seconds (median after the warm-up steps), page faults,
and CPU seconds spent in the kernel; per process: peak resident memory.

    python benchmarks/cpu_heap.py --steps 6 --rounds 2 --out benchmarks/results/cpu_heap.json
    python benchmarks/cpu_heap.py --models recursive --settings keep return --out benchmarks/results/cpu_heap_return.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
from pathlib import Path

SETTINGS = ("glibc", "keep", "return")
RANKS = {"q": 84, "k": 114, "v": 179, "o": 162, "gate": 214, "up": 250, "down": 384}


def child(model: str, setting: str, steps: int, warmup: int) -> dict:
    import resource
    import time

    from recursify.cpu_heap import keep_freed_memory, return_freed_memory

    heap = contextlib.ExitStack()  # held for the whole child: the setting lasts while it is open
    if setting != "glibc":
        block = keep_freed_memory() if setting == "keep" else return_freed_memory()
        assert heap.enter_context(block), "glibc's mallopt refused"
    import torch

    import recursify as rf
    from recursify.conversion.baselines import matched
    from recursify.train.losses import LossConfig, distillation_loss

    torch.manual_seed(0)
    teacher, _ = rf.load_pretrained("smollm2-135m")
    recursion = rf.RecursionConfig(num_loops=30, init="average", lora_rank=0, rank_pattern=RANKS)
    student = rf.convert(teacher, recursion, progress=False)
    if model == "plain":
        student = matched(teacher, student.parameter_breakdown()["total"])
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=True)
    usage = lambda: resource.getrusage(resource.RUSAGE_SELF)  # noqa: E731
    rows = []
    for _ in range(steps):
        ids = torch.randint(0, teacher.config.vocab_size, (4, 256))
        u0, t0 = usage(), time.perf_counter()
        with torch.no_grad():
            logits = teacher(input_ids=ids, use_cache=False).logits
        out = distillation_loss(student, ids, logits, LossConfig())
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, out
        u1 = usage()
        rows.append((time.perf_counter() - t0, u1.ru_minflt - u0.ru_minflt, u1.ru_stime - u0.ru_stime))
    measured = sorted(rows[warmup:])
    mid = measured[len(measured) // 2]
    return {"model": model, "setting": setting, "step_s": mid[0], "tokens_per_s": 1024 / mid[0],
            "page_faults_per_step": mid[1], "kernel_s_per_step": mid[2],
            "step_times_s": [round(r[0], 3) for r in rows], "peak_rss_mb": usage().ru_maxrss / 1024}


def mean_step(rows: list[dict], model: str, setting: str) -> float:
    steps = [r["step_s"] for r in rows if r["model"] == model and r["setting"] == setting]
    return sum(steps) / len(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--rounds", type=int, default=2, help="alternate the settings this many times per model: "
                   "step times drift on a shared CPU")
    p.add_argument("--models", nargs="+", default=["recursive", "plain"], choices=("recursive", "plain"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--out", default="benchmarks/results/cpu_heap.json")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.warmup)))
        return
    rows = []
    for model in args.models:
        for setting in args.settings * args.rounds:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--child", model, setting]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model:9s} {setting:7s}  {r['step_s']:.2f} s/step  {r['tokens_per_s']:.0f} tok/s  "
                  f"{r['page_faults_per_step']:>8d} faults  {r['kernel_s_per_step']:.2f} s in the kernel  "
                  f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
    for model in args.models:
        first, *others = args.settings
        base = mean_step(rows, model, first)
        for setting in others:
            t = mean_step(rows, model, setting)
            print(f"{model}: {base / t:.2f}x the steps per second with {setting} against {first} "
                  f"({t:.2f} s against {base:.2f} s a step, mean of {args.rounds} processes each)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/cpu_heap.py " + " ".join(sys.argv[1:]),
                                          "cpu": platform.processor() or platform.machine(), "steps": args.steps,
                                          "warmup": args.warmup, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
