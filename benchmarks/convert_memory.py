"""Where the calibrated conversion's resident memory goes: each step's peak.

Runs `recursify.conversion.recipe.calibrated_convert` as `compress` does for the demo (SmolLM2-135M,
10 loops, calibrated init, the output curvature, per-linear ranks for 75 % of the parameters, the
sequential refit on 8,192 tokens) inside `cpu_heap.return_freed_memory()`, and samples the RSS every
20 ms, keeping the maximum of each step: the statistics, the curvature, the rank allocation, the
conversion, the refit. The statistics and the curvature come from $RECURSIFY_CACHE when they are
there (their peaks are then a file read).

    python benchmarks/convert_memory.py --out benchmarks/results/convert_memory_demo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--loops", type=int, default=10)
    ap.add_argument("--target-params", type=float, default=0.75)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--data", default="corpus/python-docs/train")
    ap.add_argument("--out", default="benchmarks/results/convert_memory_demo.json")
    args = ap.parse_args(argv)

    import recursify as rf
    from recursify.conversion import recipe
    from recursify.conversion.calibrate import cached_stats, calibration_sequences
    from recursify.cpu_heap import return_freed_memory
    from recursify.hub import cache_root
    from recursify.util.memory import GiB, PhasePeaks

    peaks = PhasePeaks(interval=0.02, phase="load")
    label = peaks.during
    recipe.with_curvature = label("output curvature", recipe.with_curvature)
    recipe.allocate_ranks = label("rank allocation", recipe.allocate_ranks)
    recipe.convert = label("conversion", recipe.convert)
    recipe.sequential_calibrate = label("sequential refit", recipe.sequential_calibrate)
    t0 = time.perf_counter()
    with return_freed_memory():
        teacher, tok = rf.load_pretrained(args.model)
        pool = calibration_sequences([args.data], tok, args.calib_tokens, 256)
        peaks.switch("statistics")
        stats = cached_stats(teacher, pool, cache_root() / "calibration")
        peaks.switch("other")
        recipe.calibrated_convert(teacher, rf.RecursionConfig(num_loops=args.loops, init="calibrated"), stats,
                                  pool[:32], sequential=True, curvature=True, allocate_to=args.target_params)
    peaks.close()
    rows = {k: v / GiB for k, v in peaks.peaks.items() if k not in ("other", "done")}
    for k, v in rows.items():
        print(f"{k:<18} {v:6.2f} GiB")
    print(f"peak {max(rows.values()):.2f} GiB, {time.perf_counter() - t0:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "convert_memory", "command": "python benchmarks/convert_memory.py "
                                          + " ".join(argv or sys.argv[1:]), "machine": platform.processor() or
                                          platform.machine(), "args": vars(args), "peak_gib": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
