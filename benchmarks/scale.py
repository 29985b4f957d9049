"""A 1B-class model through `recursify compress`: the planner's memory estimate against the
measured peak and time of every stage.

Builds TinyLlama-1.1B's shape (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads)
with random weights and SmolLM2's bundled tokenizer (vocabulary 49152, embeddings tied as SmolLM2's
are: 1.07B parameters), saves it
as a float32 safetensors folder, then runs `compress --loops 2 --lora-rank 64` in this process
with a budget that allows a few distillation steps. Random weights measure memory and time, not
quality. A sampling thread (`recursify.util.memory.PhasePeaks`) reads the process's resident memory (or, on a GPU, the allocator's
peak) every 0.2 s and keeps each stage's maximum; the stages are compress's own log lines.

    python benchmarks/scale.py --time-budget 45m --out benchmarks/results/scale_tinyllama_cpu.json
    python benchmarks/scale.py --tiny --time-budget 3m --out /tmp/scale_tiny.json   # a smoke run
    python benchmarks/scale.py --model smollm2-135m --loops auto --target-params 0.75 --time-budget 10m \
        --max-tokens 0 --out benchmarks/results/scale_demo_cpu.json   # any model: the demo's stages

Prints a table (stage, estimated peak, measured peak, seconds) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True)
TINY = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


STAGE_OF_LOG = [(r"^\[1/5\]", "load"), (r"^\[2/5\]", "calibrate"), (r"^\[3/5\] converting", "convert"),
                (r"^\[3/5\]", "layout search"), (r"^\[4/5\] local", "local"), (r"^\[4/5\]", "distil"),
                (r"^\[5/5\]", "evaluate")]


def build_model(folder: Path, shape: dict) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recursify.hub import resolve

    tok_dir, gguf = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(tok_dir, gguf_file=gguf)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # small weights: a random 1B model's activations stay finite through 22 layers
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model of the same kind (a smoke run)")
    ap.add_argument("--model", default=None, help="an existing model (bundled name or folder) instead of the random 1B")
    ap.add_argument("--loops", default="2", help="compress --loops (a number or auto)")
    ap.add_argument("--lora-rank", default="64", help="compress --lora-rank (a number, or auto with --target-params)")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="compress --calib-tokens")
    ap.add_argument("--target-params", type=float, default=None, help="compress --target-params (with --loops auto)")
    ap.add_argument("--data", default="corpus/python-docs/train", help="training text (scripts/fetch_corpora.sh)")
    ap.add_argument("--heldout", default="corpus/python-docs/heldout", help="held-out text ('': a held-out share of --data, as the demo)")
    ap.add_argument("--time-budget", default="45m")
    ap.add_argument("--max-tokens", type=int, default=4096, help="distillation tokens at most (0: what the budget allows)")
    ap.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--work", default=None, help="folder for the model and the run (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/results/scale_tinyllama_cpu.json")
    args = ap.parse_args(argv)

    from recursify.compress import CompressConfig, compress, parse_duration
    from recursify.util.device import resolve_placement, total_memory
    from recursify.util.memory import GiB, PhasePeaks

    try:
        budget = parse_duration(args.time_budget)
        where = resolve_placement(args.device, args.dtype)
        loops = args.loops if args.loops == "auto" else int(args.loops)
        rank = None if loops == "auto" else "auto" if args.lora_rank == "auto" else int(args.lora_rank)
    except ValueError as e:
        ap.error(str(e))
    work = Path(args.work or tempfile.mkdtemp(prefix="recursify-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    peaks = PhasePeaks(where.device, phase="build")
    t0 = time.monotonic()
    shape = None if args.model else TINY if args.tiny else TINYLLAMA
    params = build_model(work / "model", shape) if shape else None
    estimates: dict[str, float] = {}
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        m = re.match(r"memory plan \(estimated peaks\): (.*); ([\d.]+) GiB usable", line)
        if m:
            for part in m.group(1).split(", "):
                name, value, _ = part.rsplit(" ", 2)
                estimates[name] = float(value)
        for pattern, stage in STAGE_OF_LOG:
            if re.match(pattern, line):
                peaks.switch(stage)
                break

    cfg = CompressConfig(model=args.model or str(work / "model"), out=str(work / "out"), data=[args.data],
                         heldout=[args.heldout] if args.heldout else None, loops=loops, calib_tokens=args.calib_tokens,
                         lora_rank=rank,
                         target_params=args.target_params, time_budget=budget, max_tokens=args.max_tokens or None,
                         device=args.device, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                         overwrite=True)
    error = None
    try:
        summary = compress(cfg, log=log)
    except Exception as e:  # noqa: BLE001 - a failed run is a result too: its peaks are recorded
        error, summary = f"{type(e).__name__}: {e}", None
    total_s = time.monotonic() - t0
    peaks.close()
    if not args.work:  # its own temporary folder: the model and the run go with it
        shutil.rmtree(work, ignore_errors=True)

    # Estimates are per compress stage; load and layout search run beside calibration's memory.
    estimate_of = {"calibrate": "calibrate", "convert": "convert", "distil": "distil", "evaluate": "evaluate"}
    rows = []
    for stage, peak in peaks.peaks.items():
        est = estimates.get(estimate_of.get(stage, ""), None)
        rows.append({"stage": stage, "measured_peak_gib": peak / GiB, "estimated_peak_gib": est,
                     "seconds": peaks.seconds.get(stage, 0.0)})
    overall = max(peaks.peaks.values())
    planned = max(estimates.values()) if estimates else None
    result = {
        "benchmark": "scale", "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model or "random", "shape": shape, "params": params, "device": str(where.device),
        "dtype": where.dtype_name, "machine": platform.processor() or platform.machine(),
        "device_name": __import__("torch").cuda.get_device_name(where.device) if where.device.type == "cuda" else "cpu",
        "memory_total_gib": total_memory(where.device) / GiB, "time_budget": args.time_budget,
        "stages": rows, "measured_peak_gib": overall / GiB, "estimated_peak_gib": planned,
        "estimate_error": (planned - overall / GiB) / (overall / GiB) if planned else None,
        "total_seconds": total_s, "error": error, "log": lines,
        "summary": {k: summary[k] for k in ("ppl", "train") if summary and k in summary} if summary else None,
    }
    print(f"\n{'stage':<14} {'estimated':>10} {'measured':>10} {'seconds':>9}")
    for r in rows:
        est = f"{r['estimated_peak_gib']:.1f}" if r["estimated_peak_gib"] is not None else "-"
        print(f"{r['stage']:<14} {est:>10} {r['measured_peak_gib']:>10.1f} {r['seconds']:>9.0f}")
    print(f"peak {overall / GiB:.1f} GiB measured, {planned if planned is not None else float('nan'):.1f} GiB planned; "
          f"{total_s:.0f} s" + (f"; error: {error}" if error else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
