"""Where a KD step's resident memory goes: each phase's peak against what is alive.

Builds a Llama of TinyLlama's width (hidden 2048, intermediate 5632, 32 heads, 4 KV heads, SmolLM2's
tokenizer, tied embeddings) with `--layers` layers and random weights, or loads `--model`, converts
it to a `--loops`-loop student with LoRA rank `--lora-rank` (average init), and runs a few KD steps
of 4 x 256 tokens (gradient checkpointing on unless `--checkpointing off`) through
`recursify.train.train`, each allocator/optimizer setting in its own process.
A thread samples the resident memory every 20 ms and keeps the maximum of each phase (teacher
forward, student forward and loss, backward, clipping, AdamW step, checkpoint save), beside the
floor: the process before training plus the student's gradients and AdamW's two moments.

    python benchmarks/kd_memory.py --layers 6 --out benchmarks/results/kd_memory.json
    python benchmarks/kd_memory.py --model gemma3-270m --loops 6 --lora-rank 69 --checkpointing off \
        --settings return --out benchmarks/results/kd_memory_gemma3.json   # compress's 20-minute Gemma run

Settings: `glibc` (the allocator's defaults, unfused AdamW: what distillation did before),
`return` (`cpu_heap.return_freed_memory`, fused AdamW: what `compress` runs) and `keep`
(`cpu_heap.keep_freed_memory`, fused AdamW: `recursify train`'s default).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("glibc", "return", "keep")


def child(setting: str, args) -> dict:
    import contextlib

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import recursify as rf
    from recursify import cpu_heap
    from recursify.cpu_heap import (
        keep_freed_memory,
        release_freed_memory,
        return_freed_memory,
    )
    from recursify.hub import resolve
    from recursify.train import optim
    from recursify.train import trainer as T
    from recursify.util.memory import GiB, PhasePeaks, rss_bytes

    if args.model:
        teacher, tok = rf.load_pretrained(args.model)
        teacher.eval()
    else:
        tok_dir, gguf = resolve("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(tok_dir, gguf_file=gguf)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in teacher.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=args.loops, lora_rank=args.lora_rank, init="average"), progress=False)
    work = Path(tempfile.mkdtemp(prefix="recursify-kd-memory-"))
    student.save_pretrained(work / "student")
    release_freed_memory()
    before = rss_bytes()
    n_student = sum(p.numel() for p in student.parameters())
    if setting == "glibc":  # the allocator's defaults and the unfused AdamW, as distillation ran before
        optim.FUSED_DEVICES = ()
        cpu_heap.return_freed_memory = contextlib.nullcontext
    peaks = PhasePeaks(interval=0.02, phase="setup")
    label = peaks.during
    T._teacher_outputs = label("teacher forward", T._teacher_outputs)
    T.Distiller.forward = label("student forward + loss", T.Distiller.forward)
    import accelerate

    accelerate.Accelerator.backward = label("backward", accelerate.Accelerator.backward)
    accelerate.Accelerator.clip_grad_norm_ = label("clip", accelerate.Accelerator.clip_grad_norm_)
    torch.optim.AdamW.step = label("AdamW step", torch.optim.AdamW.step)
    T.save_checkpoint = label("checkpoint save", T.save_checkpoint)
    heap = {"glibc": contextlib.nullcontext, "return": return_freed_memory, "keep": keep_freed_memory}[setting]
    t0 = time.perf_counter()
    with heap():  # train() then runs inside it (reuse_freed_memory only for "keep")
        T.train(T.TrainConfig(student=str(work / "student"), teacher="random", data=["corpus/python-docs/train"],
                              out=str(work / "kd"), max_tokens=args.steps * 1024, seq_len=256, batch_size=4, eval_every=-1,
                              gradient_checkpointing=args.checkpointing == "on", reuse_freed_memory=setting == "keep",
                              save_every=args.steps,
                              keep_last=1, warmup_steps=1, eval_tokens=1024, progress=False),
                teacher=(teacher, tok), student=(student, tok))
    seconds = time.perf_counter() - t0
    peaks.close()
    shutil.rmtree(work, ignore_errors=True)
    floor = before + 12 * n_student  # gradients and AdamW's two moments, float32
    return {"setting": setting, "model": args.model or "random", "layers": args.layers, "loops": args.loops,
            "lora_rank": args.lora_rank, "checkpointing": args.checkpointing, "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": n_student, "before_gib": before / GiB, "floor_gib": floor / GiB,
            "peak_gib": max(peaks.peaks.values()) / GiB, "train_seconds": seconds,
            "phases_gib": {k: v / GiB for k, v in peaks.peaks.items() if k not in ("setup", "done")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6, help="the random teacher's layers (22: TinyLlama's 1B shape)")
    ap.add_argument("--model", default=None, help="a real teacher (bundled name or folder) instead of the random one")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--checkpointing", default="on", choices=("on", "off"), help="gradient checkpointing")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--out", default="benchmarks/results/kd_memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for setting in args.settings:  # one process each: an allocator's retained memory would count for the next
        out = subprocess.run([sys.executable, __file__, "--child", setting, *(argv if argv is not None else sys.argv[1:])],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    phases = list(dict.fromkeys(k for r in rows for k in r["phases_gib"]))
    print(f"{'phase (GiB)':<24}" + "".join(f"{r['setting']:>10}" for r in rows))
    for k in phases:
        print(f"{k:<24}" + "".join(f"{r['phases_gib'].get(k, float('nan')):>10.2f}" for r in rows))
    for key in ("floor_gib", "peak_gib", "train_seconds"):
        print(f"{key:<24}" + "".join(f"{r[key]:>10.2f}" for r in rows))
    result = {"benchmark": "kd_memory", "command": "python benchmarks/kd_memory.py " + " ".join(argv or sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
