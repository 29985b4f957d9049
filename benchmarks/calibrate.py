"""Plain vs calibrated (activation-aware) conversion, no training: held-out perplexity and cost.

    python benchmarks/calibrate.py --model smollm2-135m --data corpus/python-docs/train \
        --heldout corpus/python-docs/heldout --ranks 64,256 --inits average,stepwise
    python benchmarks/calibrate.py --ranks 64 --inits average,calibrated [--allocate]
    python benchmarks/calibrate.py --loops 10 --ranks 204 --inits calibrated --calib-tokens 2048,8192,16384 --no-sequential
    python benchmarks/calibrate.py --loops 10 --ranks 204 --inits calibrated --calib-tokens 8192 --curvature

Prints a table and writes benchmarks/results/calibrate.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import recursify as rf
from recursify.conversion.allocate import allocate_ranks, parameter_count
from recursify.conversion.calibrate import calibrate, calibration_sequences
from recursify.conversion.curvature import with_curvature
from recursify.conversion.sequential import sequential_calibrate
from recursify.eval.metrics import perplexity
from recursify.data import DataConfig, build_datasets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="corpus/python-docs/train")
    ap.add_argument("--heldout", default="corpus/python-docs/heldout")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--ranks", default="64,256")
    ap.add_argument("--inits", default="average,stepwise")
    ap.add_argument("--calib-tokens", type=token_counts, default=[16384],
                    help="Calibration tokens; a comma list converts with each.")
    ap.add_argument("--no-sequential", dest="sequential", action="store_false", help="Skip the sequential refit rows.")
    ap.add_argument("--seq-tokens", type=int, default=8192, help="Tokens for sequential calibration (and the curvature).")
    ap.add_argument("--curvature", action="store_true",
                    help="Add rows fitted on both sides: the teacher's output curvature (recursify.conversion.curvature) on --seq-tokens.")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--allocate", action="store_true",
                    help="Per-linear ranks (recursify.conversion.allocate) at each uniform rank's parameter count.")
    ap.add_argument("--out", default="benchmarks/results/calibrate.json")
    args = ap.parse_args(argv)

    teacher, tok = rf.load_pretrained(args.model)
    held, _ = build_datasets(DataConfig(sources=[args.heldout], seq_len=args.seq_len, heldout_fraction=0.0,
                                        max_tokens=args.eval_tokens), tok)
    stream = torch.as_tensor(held.read_tokens(0, min(held.num_tokens, args.eval_tokens)).astype("int64"))

    def ppl(model):
        return perplexity(model, stream, context_len=args.seq_len, stride=args.seq_len)["ppl"]

    rows = [{"model": "teacher", "ppl": ppl(teacher)}]
    for n_tokens in args.calib_tokens:
        t0 = time.perf_counter()
        stats = calibrate(teacher, tok, [args.data], num_tokens=n_tokens, seq_len=args.seq_len)
        calib_s = time.perf_counter() - t0
        print(f"statistics of {stats.num_tokens} tokens in {calib_s:.0f} s (0 s when cached)", flush=True)
        common = {"calib_tokens": stats.num_tokens, "calibration_s": calib_s}
        if args.curvature:
            t0 = time.perf_counter()
            seqs = calibration_sequences([args.data], tok, args.seq_tokens, args.seq_len)
            stats = with_curvature(stats, teacher, seqs, cache=False)  # timed: never from the cache
            common["curvature_s"] = time.perf_counter() - t0
            print(f"output curvature of {seqs.numel()} tokens in {common['curvature_s']:.0f} s", flush=True)
        rows += convert_all(args, teacher, tok, stats, ppl, common)

    print(f"\nteacher held-out ppl {rows[0]['ppl']:.2f}\n")
    g = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    print("| init | rank | calibration tokens | params | plain ppl | calibrated ppl | + sequential ppl | "
          "plain / calibrated | plain / sequential | convert s (calibrated / sequential) |"
          + (" both sides | both sides + sequential | convert s (both / + sequential) |" if args.curvature else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.curvature else ""))
    for r in rows[1:]:
        rank = r["rank"] if r["ranks"] == "uniform" else f"allocated ({r['rank']}-equivalent)"
        both = (f" {g(r.get('curvature_ppl'))} | {g(r.get('sequential_curvature_ppl'))} | "
                f"{r['curvature_convert_s']:.0f} / {g(r.get('sequential_curvature_convert_s'))} |") if args.curvature else ""
        print(f"| {r['init']} | {rank} | {r['calib_tokens']} | {r['params'] / 1e6:.1f}M | {g(r['plain_ppl'])} | "
              f"{g(r['calibrated_ppl'])} | {g(r.get('sequential_ppl'))} | {g(r['ratio'])} | "
              f"{g(r['ratio_sequential'])} | {r['calibrated_convert_s']:.0f} / {g(r.get('sequential_convert_s'))} |" + both)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def token_counts(text: str) -> list[int]:
    """'2048,8192' -> [2048, 8192], checked before the model loads."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return counts


def convert_all(args, teacher, tok, stats, ppl, common: dict) -> list[dict]:
    """Every init × rank converted with `stats`: plain, calibrated and (optionally) sequential."""
    rows = []
    for init in args.inits.split(","):
        for rank in args.ranks.split(","):
            cfg = rf.RecursionConfig(num_loops=args.loops, init=init, lora_rank=rank)
            ranks = "uniform"
            if args.allocate:  # the same parameter count, ranks chosen per linear
                target = parameter_count(teacher, cfg) / sum(p.numel() for p in teacher.parameters())
                cfg = dataclasses.replace(cfg, lora_rank=0, rank_pattern=allocate_ranks(teacher, cfg, stats, target))
                ranks = cfg.rank_pattern
            row = {"init": init, "rank": rank, "ranks": ranks, "plain_ppl": None, "ratio": None, "ratio_sequential": None,
                   **common}
            inputs_only = dataclasses.replace(stats, curvature=None, curvature_tokens=0)
            variants = [("plain", {}), ("calibrated", {"calibration": inputs_only}),
                        ("sequential", {"calibration": inputs_only})]
            if stats.curvature is not None:
                variants += [("curvature", {"calibration": stats}), ("sequential_curvature", {"calibration": stats})]
            for name, kw in variants:
                if name == "plain" and init == "calibrated" or name.startswith("sequential") and not args.sequential:
                    continue  # a calibrated init has no plain counterpart; --no-sequential
                t0 = time.perf_counter()
                model = rf.convert(teacher, cfg, progress=False, **kw)
                if name.startswith("sequential"):
                    seqs = calibration_sequences([args.data], tok, args.seq_tokens, args.seq_len)
                    sequential_calibrate(model, teacher, seqs, curvature=kw["calibration"].curvature)
                row[f"{name}_convert_s"] = time.perf_counter() - t0
                row[f"{name}_ppl"] = ppl(model)
                row["params"] = model.parameter_breakdown()["total"]
            if row["plain_ppl"] is not None:
                row["ratio"] = row["plain_ppl"] / row["calibrated_ppl"]
                row["ratio_sequential"] = row["plain_ppl"] / row["sequential_ppl"] if args.sequential else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
