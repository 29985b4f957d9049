"""Held-out perplexity against wall-clock seconds for each recovery recipe, in one run.

    python benchmarks/recover.py --minutes 6 --recipes plain-kd,calibrated-kd,calibrated-local-kd

Every recipe gets the same training wall-clock budget (local distillation + KD through
`recursify.train`), starting from its converted model; held-out evaluations pause the clock. The
preparation (calibration statistics computed afresh once, conversion, the sequential refit) is
measured and reported beside it, and shared by the recipes that start from the same conversion.
Writes benchmarks/results/recover.json and recover.png.

Recipes: plain-kd (plain SVD conversion, KD), calibrated-kd (calibrated + sequential, KD),
curvature-kd (the same fitted on both sides: the teacher's output curvature on --seq-tokens too),
calibrated-local-kd (the same, then --local-fraction of the training time on local distillation
before KD), allocated-kd (calibrated + sequential with --target-params ranks chosen per linear),
curvature-allocated-kd (curvature-kd with the ranks chosen per linear by the Fisher-weighted gains),
baseline-kd (the parameter-matched plain model: the largest stepwise layer subset of the teacher
with no more parameters than the recursive student, distilled the same way).
A recipe may carry its own learning rate, trainable set, hidden-state distillation weight and
batch size, NAME[:LR[:TRAINABLE[:HIDDEN[:BATCH]]]], e.g.
`--recipes calibrated-kd:1e-3,calibrated-kd:3e-4:body:1,calibrated-kd:3e-4:all:0:1,baseline-kd:1e-3`;
the defaults are --lr, --trainable (all, body, lora, shared or norms, as in `recursify train`),
--hidden-weight and --batch-size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import recursify as rf
from recursify.conversion.calibrate import calibration_sequences, collect_stats
from recursify.conversion.curvature import with_curvature
from recursify.conversion.sequential import sequential_calibrate
from recursify.data import DataConfig, build_datasets
from recursify.eval.metrics import perplexity
from recursify.train import TrainConfig, train
from recursify.train.local import local_distill

RECIPES = ("plain-kd", "calibrated-kd", "curvature-kd", "calibrated-local-kd", "allocated-kd", "curvature-allocated-kd",
           "baseline-kd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="corpus/python-docs/train")
    ap.add_argument("--heldout", default="corpus/python-docs/heldout")
    ap.add_argument("--recipes", default="plain-kd,calibrated-kd,calibrated-local-kd")
    ap.add_argument("--minutes", type=float, default=6.0, help="Training budget per recipe.")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--strategy", default="cycle", help="Layer-to-slot map of the recursive recipes (recursify convert --strategy).")
    ap.add_argument("--rank", default="64", help="LoRA rank, or 'fill': the largest rank (each linear capped at its "
                                               "full rank) that fits --target-params, as compress --loops auto gives.")
    ap.add_argument("--init", default="average", help="Shared-weight init of the calibrated recipes.")
    ap.add_argument("--target-params", type=float, default=None,
                    help="allocated-kd, --rank fill: parameter fraction (allocated-kd's default: that of --rank uniform).")
    ap.add_argument("--local-fraction", type=float, default=0.3)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=4, help="KD steps between held-out evaluations at --batch-size (the same "
                                                            "tokens between them for a recipe with its own batch).")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4, help="Peak learning rate of a recipe that names none.")
    ap.add_argument("--trainable", default="all", help="What KD trains in a recipe that names nothing: all, body, "
                                                      "lora, shared or norms (see recursify train).")
    ap.add_argument("--hidden-weight", type=float, default=0.0,
                    help="Hidden-state distillation weight of a recursive recipe that names none (recursify train "
                         "--hidden-weight).")
    ap.add_argument("--shared-lr-scale", type=float, default=1.0,
                    help="LR of the recursive models' shared weights as a fraction of the recipe's lr.")
    ap.add_argument("--out", default="benchmarks/results/recover.json")
    args = ap.parse_args(argv)
    if args.rank != "fill" and not args.rank.isdigit():
        ap.error(f"--rank must be a number or fill, got {args.rank!r}")
    if args.rank == "fill" and args.target_params is None:
        ap.error("--rank fill needs --target-params")
    runs = []
    for item in args.recipes.split(","):
        name, lr, trainable, hidden, batch = (item.split(":") + [None] * 4)[:5]
        try:
            run = (name, float(lr) if lr else args.lr, trainable or args.trainable,
                   float(hidden) if hidden else args.hidden_weight, int(batch) if batch else args.batch_size)
        except ValueError:
            ap.error(f"recipe {item!r}: expected NAME[:LR[:TRAINABLE[:HIDDEN[:BATCH]]]] with numbers for LR, HIDDEN, BATCH")
        if run[4] < 1:
            ap.error(f"recipe {item!r}: the batch size must be at least 1")
        runs.append(run)
    recipes = [r[0] for r in runs]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    budget = 60 * args.minutes

    teacher, tok = rf.load_pretrained(args.model)
    held, _ = build_datasets(DataConfig(sources=[args.heldout], seq_len=args.seq_len, heldout_fraction=0.0,
                                        max_tokens=args.eval_tokens), tok)
    stream = torch.as_tensor(held.read_tokens(0, min(held.num_tokens, args.eval_tokens)).astype("int64"))

    def ppl(model):
        return perplexity(model, stream, context_len=args.seq_len, stride=args.seq_len)["ppl"]

    seqs = calibration_sequences([args.data], tok, args.calib_tokens, args.seq_len)
    t0 = time.perf_counter()
    stats = collect_stats(teacher, seqs)  # never from the cache: its cost is part of the recipes
    calib_s = time.perf_counter() - t0
    base = rf.RecursionConfig(num_loops=args.loops, strategy=args.strategy, init="average",
                              lora_rank=0 if args.rank == "fill" else int(args.rank))
    if args.rank == "fill":
        from recursify.conversion.layout_search import largest_rank

        base = largest_rank(teacher, base, int(args.target_params * sum(p.numel() for p in teacher.parameters())))
        if base is None:
            ap.error(f"{args.loops} loops do not fit --target-params {args.target_params}")
        print(f"{args.loops} loops, ranks {base.rank_text}", flush=True)
    teacher_ppl = ppl(teacher)
    print(f"teacher held-out ppl {teacher_ppl:.2f}; statistics of {stats.num_tokens} tokens in {calib_s:.0f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="recursify-recover-"))
    teacher_dir = work / "teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    prepared: dict[str, tuple[Path, float]] = {}

    def prepare(kind: str) -> tuple[Path, float]:
        """The converted model's folder and the seconds it cost (calibration included)."""
        if kind in prepared:
            return prepared[kind]
        t = time.perf_counter()
        if kind == "plain":
            model = rf.convert(teacher, base, progress=False)
        elif kind == "baseline":
            from recursify.conversion.allocate import parameter_count
            from recursify.conversion.baselines import matched

            model = matched(teacher, parameter_count(teacher, base))
            print(f"baseline: {model.config.num_hidden_layers} plain layers", flush=True)
        else:
            recursion = dataclasses.replace(base, init=args.init)
            fitted = stats
            if kind.startswith("curvature"):  # computed afresh, never from the cache: its cost is part of the recipe
                fitted = with_curvature(stats, teacher, seqs[: args.seq_tokens // args.seq_len], cache=False)
            if kind.endswith("allocated"):
                from recursify.conversion.allocate import allocate_ranks, parameter_count

                target = args.target_params or parameter_count(teacher, base) / sum(p.numel() for p in teacher.parameters())
                recursion = dataclasses.replace(recursion, lora_rank=0,
                                                rank_pattern=allocate_ranks(teacher, recursion, fitted, target))
                print(f"allocated ranks for {target:.3f} of the teacher: {recursion.rank_pattern}", flush=True)
            model = rf.convert(teacher, recursion, progress=False, calibration=fitted)
            sequential_calibrate(model, teacher, seqs[: args.seq_tokens // args.seq_len], curvature=fitted.curvature)
        seconds = time.perf_counter() - t + (0 if kind in ("plain", "baseline") else calib_s)
        folder = work / kind
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        prepared[kind] = (folder, seconds)
        return prepared[kind]

    rows = []
    for recipe, lr, trainable, hidden, batch in runs:
        kind = {"plain-kd": "plain", "allocated-kd": "allocated", "baseline-kd": "baseline",
                "curvature-kd": "curvature", "curvature-allocated-kd": "curvature-allocated"}.get(recipe, "calibrated")
        folder, prep_s = prepare(kind)
        clock = 0.0
        student, _ = rf.load_pretrained(str(folder))
        points = [{"seconds": clock, "ppl": ppl(student), "stage": "converted"}]
        params = sum(p.numel() for p in student.parameters())
        local = None
        if recipe == "calibrated-local-kd":
            local_seqs = calibration_sequences([args.data], tok, 65536, args.seq_len)
            local = local_distill(student, teacher, local_seqs, lr=lr, batch_size=args.batch_size,
                                  max_time=args.local_fraction * budget)
            clock += local["seconds"]
            points.append({"seconds": clock, "ppl": ppl(student), "stage": "local"})
            folder = work / f"{recipe}-local"
            student.save_pretrained(folder)
            tok.save_pretrained(folder)
        del student
        if kind == "baseline":  # a plain model: no shared weights, LoRA or unrolled positions
            trainable, hidden, shared_lr_scale = ("body" if trainable == "body" else "all"), 0.0, 1.0
        else:
            shared_lr_scale = args.shared_lr_scale
        kd_out = work / f"{recipe}-{lr:g}-{trainable}-{hidden:g}-{batch}-kd"
        result = train(TrainConfig(
            student=str(folder), teacher=str(teacher_dir), data=[args.data], heldout=[args.heldout], out=str(kd_out),
            max_tokens=10**9, seq_len=args.seq_len, batch_size=batch, lr=lr, warmup_steps=5,
            trainable=trainable, hidden_weight=hidden, shared_lr_scale=shared_lr_scale,
            eval_every=max(1, args.eval_every * args.batch_size // batch), eval_tokens=args.eval_tokens, save_every=-1, max_time=max(1.0, budget - clock),
            eval_pauses_clock=True,
            progress=False))
        kd_clock = clock
        for rec in map(json.loads, (kd_out / "metrics.jsonl").read_text().splitlines()):
            if rec["kind"] == "train":
                kd_clock += rec["step_s"]
            elif rec["kind"] == "eval" and rec["step"] > 0:
                points.append({"seconds": kd_clock, "ppl": rec["ppl"], "stage": "kd", "step": rec["step"]})
        row = {"recipe": recipe, "lr": lr, "trainable": trainable, "hidden_weight": hidden, "batch_size": batch,
               "shared_lr_scale": shared_lr_scale, "params": params, "points": points, "final_ppl": points[-1]["ppl"],
               "kd_tokens": result.get("tokens"), "local": local, "prep_seconds": prep_s}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)

    print(f"\nteacher held-out ppl {teacher_ppl:.2f}; {args.minutes:g} training minutes per recipe\n")
    print("| recipe | lr | trains | hidden | batch | params | prep s | converted ppl | final ppl | KD tokens |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['lr']:g} | {r['trainable']} | {r['hidden_weight']:g} | {r['batch_size']} | {r['params'] / 1e6:.1f}M | {r['prep_seconds']:.0f} | "
              f"{r['points'][0]['ppl']:.4g} | {r['final_ppl']:.4g} | {r['kd_tokens']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "recursion": base.to_dict(), "teacher_ppl": teacher_ppl,
                               "calibration_seconds": calib_s,
                               "rows": rows}, indent=1))
    plot(rows, teacher_ppl, out.with_suffix(".png"), args.minutes)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def plot(rows, teacher_ppl, path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        label = (f"{r['recipe']} lr {r.get('lr', 3e-4):g}" + (f" ({r['trainable']})" if r.get("trainable", "all") != "all" else "")
                 + (f" hidden {r['hidden_weight']:g}" if r.get("hidden_weight") else "")
                 + (f" batch {r['batch_size']}" if r.get("batch_size", 4) != 4 else ""))
        ax.plot([p["seconds"] for p in r["points"]], [p["ppl"] for p in r["points"]], marker="o", ms=3, label=label)
    ax.axhline(teacher_ppl, color="k", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Recovery per recipe, {minutes:g} training minutes each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
