"""Conversion time and peak memory on the bundled SmolLM2-135M for several LoRA ranks.

    python benchmarks/convert.py [--model smollm2-135m] [--ranks 0,64,full] [--out benchmarks/results/convert.json]

Each rank runs in a fresh subprocess so that peak RSS is that conversion's own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile, time, os
import torch, recursify as rf
from recursify.cli import dir_size
model, rank, loops, init = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = time.time(); teacher, tok = rf.load_pretrained(model); load_s = time.time() - t
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    ref = teacher(ids).logits
t = time.time()
student = rf.convert(teacher, rf.RecursionConfig(num_loops=loops, init=init, lora_rank=rank), progress=False)
convert_s = time.time() - t
with torch.no_grad():
    diff = (student(ids).logits - ref).abs().max().item()
with tempfile.TemporaryDirectory() as d:
    t = time.time(); student.save_pretrained(d); save_s = time.time() - t
    size = dir_size(d)
counts = student.parameter_breakdown()
print(json.dumps(dict(rank=rank, load_s=load_s, convert_s=convert_s, save_s=save_s, checkpoint_bytes=size,
                      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      rss_after_load_bytes=rss_loaded, max_abs_logit_diff=diff, params=counts)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", default="0,64,full")
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--init", default="stepwise")
    parser.add_argument("--out", default="benchmarks/results/convert.json")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = []
    for rank in args.ranks.split(","):
        res = subprocess.run(
            [sys.executable, "-c", CHILD, args.model, rank, str(args.loops), args.init],
            capture_output=True, text=True, check=False,
        )
        if res.returncode != 0:
            raise SystemExit(f"rank {rank} failed: {res.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))

    table = Table(title=f"convert {args.model}, {args.loops} loops, init={args.init} (CPU, {platform.processor() or platform.machine()})")
    for col in ("rank", "convert s", "target", "peak RSS", "checkpoint", "params (total)", "max |Δlogit| vs source"):
        table.add_column(col, justify="right")
    for r in rows:
        target = "< 10 s" if r["rank"] == "64" else ""
        table.add_row(
            r["rank"], f"{r['convert_s']:.1f}", target, f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{r['checkpoint_bytes'] / 2**20:.0f} MiB", f"{r['params']['total'] / 1e6:.1f}M", f"{r['max_abs_logit_diff']:.2e}",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "loops": args.loops, "init": args.init, "time": time.time(),
                               "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
