"""Shared weights from calibration: which fit helps the converted model, untrained.

    python benchmarks/shared_init.py

SmolLM2-135M, 2 loops, cycle; every calibrated variant uses the same cached statistics. Variants
of `recursify.conversion.calibrate.fit_shared`: the activation-weighted least-squares fit with raw or
per-layer normalised covariances (rank-0 fit, then the calibrated LoRA), and the joint fit that
alternates shared weights and LoRA. Prints JSON lines and writes benchmarks/results/shared_init.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import recursify as rf
import recursify.conversion.convert  # noqa: F401 - the module, patched below (rf.convert is the function)
from recursify.conversion.calibrate import calibrate, fit_shared
from recursify.eval.metrics import perplexity
from recursify.data import DataConfig, build_datasets

VARIANTS = [  # rank, init, fit_shared options, fit at rank 0 (then the LoRA) instead of jointly
    (0, "average", {}, False),
    (0, "calibrated", {"normalise": False}, False),
    (0, "calibrated", {"normalise": True}, False),
    (64, "average", {}, False),
    (64, "calibrated", {"normalise": False}, True),
    (64, "calibrated", {"normalise": True}, True),
    (64, "calibrated", {"normalise": True, "iters": 2}, False),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="corpus/python-docs/train")
    ap.add_argument("--heldout", default="corpus/python-docs/heldout")
    ap.add_argument("--out", default="benchmarks/results/shared_init.json")
    args = ap.parse_args(argv)
    teacher, tok = rf.load_pretrained(args.model)
    held, _ = build_datasets(DataConfig(sources=[args.heldout], seq_len=256, heldout_fraction=0.0, max_tokens=4096), tok)
    stream = torch.as_tensor(held.read_tokens(0, 4096).astype("int64"))
    stats = calibrate(teacher, tok, [args.data], num_tokens=16384, seq_len=256, progress=False)
    module = sys.modules["recursify.conversion.convert"]
    rows = []
    for rank, init, options, rank0 in VARIANTS:
        module.fit_shared = lambda W, cov, slots, r, damp=0.01, **_: fit_shared(
            W, cov, slots, 0 if rank0 else r, damp=damp, **options)
        t0 = time.perf_counter()
        model = rf.convert(teacher, rf.RecursionConfig(num_loops=2, init=init, lora_rank=rank), progress=False,
                           calibration=stats)
        row = {"rank": rank, "init": init, **options, "rank0_fit": rank0,
               "convert_s": time.perf_counter() - t0,
               "ppl": perplexity(model, stream, context_len=256, stride=256)["ppl"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    module.fit_shared = fit_shared
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
