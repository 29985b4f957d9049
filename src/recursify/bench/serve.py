"""Serving benchmark (like vLLM's): Poisson arrivals, throughput, TTFT/TPOT, early-exit quality.

    recursify bench-serve --student runs/c30 --requests 24 --rate 8 --prompt-len 64 --output-len 16 \
        --hf-batching --out benchmarks/results/serve.json

(`python benchmarks/serve.py ...` in a source checkout runs the same code.)

Every row serves the SAME requests (same prompts, same arrival times); outputs are fixed-length
(ignore_eos) greedy completions. Rows (a)-(f) run in-process through `recursify.engine.LLMEngine`.

  (a)  original model, one request at a time (max batch 1)
  (b)  original model, continuous sequence-wise batching (the num_loops=1 conversion)
  (b′) original model under transformers' own continuous batching (--hf-batching), same max
       batch: checks our baseline against an engine we did not write
  (c)  the student (--student: a saved recursive checkpoint), depth-wise batching, no exit
  (c=) the same with (b)'s max batch (isolates batching from the memory the smaller model frees)
  (d0) oracle pass: full depth, records the first loop whose argmax equals the final one
  (d)  oracle exits: the depths found by (d0) replayed as real exits, with state propagation
  (e)  exit policies (confidence, entropy, hidden-state saturation), a threshold sweep each: speed,
       agreement and the measured cost of the exit decisions per step and per check; when the
       student folder has an exit classifier (`recursify exits fit`), the learned probe too, at its
       calibrated threshold and at --classifier-thresholds
  (s)  --speculative K: lossless self-speculative decoding at batch 1 (loop 1 drafts K tokens, the
       full depth verifies them in one pass), against (s0), full depth through the same decoder;
       requests back to back, arrival times ignored
  (u)  with --student: the untrained conversion of the same shape, oracle exits, as a lower bound
  (f)  relaxed recursive models converted on the fly (LoRA r=64, r=full): rows (c), (d0), (d)

Without --student the main student is an untrained conversion (init=stepwise), labelled as such.
Max batch of (b)-(e) comes from ONE memory budget for weights + KV cache (default: the original
model's weights plus --baseline-slots KV slots), so a smaller model gets more concurrent
sequences, as in the paper. Agreement compares each row's tokens with the same model's full-depth
greedy tokens ((a)'s for the original model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from .report import CPU_NOTE, make_plot, policy_table, rows_table
from .rows import hf_batching_unavailable, run_hf_row, run_row, run_speculative_row
from .student import StudentError, check_student
from .workload import agreement, make_prompts, poisson_arrivals, weight_bytes

POLICY_FLAGS = {"confidence": "thresholds", "entropy": "entropy_thresholds", "saturation": "saturation_thresholds"}


def parse_args(argv, prog):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the original model (bundled name or folder)")
    parser.add_argument("--student", default=None, help="a saved recursive checkpoint of --model (recursify compress/train output)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests/s (inf: all at once)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--loops", type=int, default=2, help="untrained student (no --student): loops")
    parser.add_argument("--rank", default="0", help="untrained student (no --student): LoRA rank")
    parser.add_argument("--relaxed-ranks", default=None, help="rows (f); default 64,full without --student, none with it")
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95,0.99", help="confidence exit sweep")
    parser.add_argument("--entropy-thresholds", default="0.5,0.7,0.9", help="entropy exit sweep (empty: skip)")
    parser.add_argument("--saturation-thresholds", default="0.9,0.95,0.99", help="saturation exit sweep (empty: skip)")
    parser.add_argument("--classifier-thresholds", default="",
                        help="classifier exit sweep besides its calibrated threshold (needs exit_classifier.safetensors "
                             "in --student; see `recursify exits fit --help`)")
    parser.add_argument("--hf-batching", action="store_true", help="row (b′): transformers' continuous batching")
    parser.add_argument("--speculative", type=int, default=0, metavar="K",
                        help="rows (s0), (s): lossless self-speculative decoding at batch 1, K loop-1 drafts per round")
    parser.add_argument("--baseline-slots", type=int, default=8, help="KV slots the original model gets in the budget")
    parser.add_argument("--memory-budget-mb", type=float, default=None, help="weights + KV cache (default: see --baseline-slots)")
    parser.add_argument("--max-batch-cap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadier on a shared CPU)")
    parser.add_argument("--device", default="auto", help="where the models run: auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that supports it, float32 on CPU), "
                        "float32, bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = parser.parse_args(argv)
    for flag in ("requests", "prompt_len", "output_len", "baseline_slots", "max_batch_cap", "threads", "loops"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if not args.rate > 0:
        parser.error(f"--rate must be positive (inf: all at once), got {args.rate}")
    from ..util.device import DeviceError, resolve_placement

    try:
        args.placement = resolve_placement(args.device, args.dtype)
    except DeviceError as e:
        parser.error(str(e))
    args.device = str(args.placement.device)
    for flag in [*POLICY_FLAGS.values(), "classifier_thresholds"]:
        try:
            setattr(args, flag, [float(x) for x in getattr(args, flag).split(",") if x.strip()])
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')}: comma-separated numbers in (0, 1]")
        if any(not 0 < t <= 1 for t in getattr(args, flag)):
            parser.error(f"--{flag.replace('_', '-')}: exit thresholds must be in (0, 1]")
    if args.relaxed_ranks is None:
        args.relaxed_ranks = "" if args.student else "64,full"
    return args


def student_classifier(folder: str, student, prog: str):
    """The exit classifier saved in the student's folder (None if there is none), checked against
    the student; a broken or mismatched one stops the benchmark with one line."""
    from ..engine.exit_classifier import CLASSIFIER_FILE, ExitClassifier, ExitClassifierError

    if not (Path(folder) / CLASSIFIER_FILE).is_file():
        return None
    try:
        classifier = ExitClassifier.load(folder)
        classifier.check(student)
    except ExitClassifierError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    return classifier


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    prog = prog or "bench-serve"

    import recursify as rf

    from ..engine import KVCache
    from ..hub import ModelLoadError, load_config

    try:  # bad arguments cost one line, before any weights are read
        teacher_config = load_config(args.model)
        student_config = check_student(args.student, teacher_config) if args.student else None
    except (StudentError, ModelLoadError) as e:
        raise SystemExit(f"{prog}: error: {str(e).strip().splitlines()[0]}") from None

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with console.status(f"loading {args.model}"):
        teacher, tok = rf.load_pretrained(args.model, device=args.device, dtype=args.placement.dtype)
    prompts = make_prompts(tok, args.requests, args.prompt_len, args.seed)
    arrivals = poisson_arrivals(len(prompts), args.rate, args.seed)
    models = {}

    def build(name, cfg):
        if name not in models:
            with console.status(f"converting: {name}"):
                models[name] = rf.convert(teacher, cfg, progress=False, dtype=args.placement.dtype)
        return models[name]

    vanilla = build("original", rf.RecursionConfig(num_loops=1))
    a = vanilla.arch
    slot_bytes = KVCache.bytes_per_slot(a.num_layers, a.num_kv_heads, a.head_dim, args.prompt_len + args.output_len)
    budget = (args.memory_budget_mb * 2**20 if args.memory_budget_mb
              else weight_bytes(vanilla) + args.baseline_slots * slot_bytes)

    def slots_for(model):
        return max(1, min(args.max_batch_cap, int((budget - weight_bytes(model)) // slot_bytes)))

    rows = []

    def record(key, label, model_name, model, result, reference=None, **extra):
        row = {"row": key, "label": label, "model": model_name, "weights_mb": weight_bytes(model) / 2**20, **result, **extra}
        if reference is not None:
            row["agreement"], row["identical"] = agreement(result["tokens"], reference)
        rows.append(row)
        cost = f"  exit {row['exit_ms_per_step']:.2f} ms/step" if row.get("exit_checks") else ""
        console.print(f"  {key:<14} {label:<48} {result['output_tok_s']:7.1f} tok/s  batch {result['max_batch']:>2}"
                      + (f"  agree {row['agreement']:.0%}" if reference is not None else "")
                      + f"  depth {result['mean_exit_depth']:.2f}{cost}")
        return row

    def serve(model, batch, **kw):
        return run_row(model, tok, prompts, arrivals, args, batch, **kw)

    console.print(f"[bold]{args.requests} requests, rate {args.rate}/s, prompt {args.prompt_len}, output {args.output_len}, "
                  f"{args.threads} thread(s), {args.placement}, budget {budget / 2**20:.0f} MiB[/bold]")
    base_batch = slots_for(vanilla)
    ra = serve(vanilla, 1)
    record("(a)", "original, one request at a time", "original", vanilla, ra)
    rb = serve(vanilla, base_batch)
    record("(b)", "original, continuous sequence-wise batching", "original", vanilla, rb, ra["tokens"])
    hf_note = None
    if args.hf_batching:
        hf_note = hf_batching_unavailable(teacher)
        if hf_note is None:
            try:
                with console.status("(b′) transformers continuous batching"):
                    rh = run_hf_row(teacher, prompts, arrivals, args, base_batch)
                record("(b′)", "original, transformers continuous batching", "original", teacher, rh, ra["tokens"])
            except Exception as e:  # noqa: BLE001 - another engine's failure is a result, not a crash
                hf_note = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if hf_note:
            console.print(f"  (b′)           transformers continuous batching: {hf_note}")

    if student_config is not None:
        name = f"student {Path(args.student).name}"
        with console.status(f"loading {args.student}"):
            student, _ = rf.load_pretrained(args.student, device=args.device, dtype=args.placement.dtype)
        models[name] = student
        classifier = student_classifier(args.student, student, prog)
        rec = student_config.recursion
        shape = dict(num_loops=int(rec["num_loops"]), lora_rank=rec.get("lora_rank", 0), strategy=rec.get("strategy", "cycle"))
    else:
        classifier = None
        shape = dict(num_loops=args.loops, lora_rank=args.rank, strategy="cycle")
        name = f"untrained B={args.loops} r={args.rank}"
        student = build(name, rf.RecursionConfig(init="stepwise", **shape))
    batch = slots_for(student)
    d0 = serve(student, batch, exit="oracle")
    full = d0["tokens"]  # oracle output == full-depth greedy output (tested invariant)
    c = serve(student, batch)
    record("(c)", "depth-wise batching, no exit", name, student, c, full)
    record("(c=)", f"depth-wise, no exit, batch {base_batch} as (b)", name, student, serve(student, base_batch), full)
    record("(d0)", "oracle pass (full depth, finds exits)", name, student, d0, full)
    d = serve(student, batch, exit="replay", schedules=d0["exit_depths"])
    record("(d)", "+ oracle exits (replayed, state propagation)", name, student, d, full)
    for mode, flag in POLICY_FLAGS.items():
        for tau in getattr(args, flag):
            e = serve(student, batch, exit=mode, threshold=tau)
            record(f"(e) {mode[:4]} {tau}", f"+ {mode} exit, τ={tau}", name, student, e, full, policy=mode, threshold=tau)
    for tau in ([None] + args.classifier_thresholds) if classifier is not None else []:
        e = serve(student, batch, exit="classifier", threshold=tau, exit_classifier=classifier)
        t, how = e["exit_threshold"], "calibrated " if tau is None else ""
        record(f"(e) clas {t:.3g}", f"+ learned exit classifier, {how}τ={t:.3g}", name, student, e, full,
               policy="classifier", threshold=round(t, 4))
    if args.speculative:
        s0 = run_speculative_row(student, prompts, args, 0)
        record("(s0)", "full depth, batch 1, back to back", name, student, s0, full)
        sk = run_speculative_row(student, prompts, args, args.speculative)
        record("(s)", f"lossless self-speculative, k={args.speculative}, batch 1", name, student, sk, full)
    if student_config is not None:
        uname = f"untrained B={shape['num_loops']} r={shape['lora_rank']}"
        untrained = build(uname, rf.RecursionConfig(init="stepwise", **shape))
        u0 = serve(untrained, batch, exit="oracle")
        u = serve(untrained, batch, exit="replay", schedules=u0["exit_depths"])
        record("(u d)", "LOWER BOUND: untrained conversion, oracle exits", uname, untrained, u, u0["tokens"])
        del models[uname]
    for rank in [r for r in args.relaxed_ranks.split(",") if r]:
        # Same max batch as (c): a full-rank LoRA stores more than the original model and
        # would not fit the budget at all; its weight size is in the table instead.
        rname = f"relaxed B={args.loops} r={rank}"
        m = build(rname, rf.RecursionConfig(num_loops=args.loops, init="stepwise", lora_rank=rank))
        f0 = serve(m, batch, exit="oracle")
        record(f"(f r={rank} c)", "untrained relaxed, no exit", rname, m, serve(m, batch), f0["tokens"])
        record(f"(f r={rank} d0)", "untrained relaxed, oracle pass", rname, m, f0, f0["tokens"])
        fd = serve(m, batch, exit="replay", schedules=f0["exit_depths"])
        record(f"(f r={rank} d)", "untrained relaxed, oracle exits", rname, m, fd, f0["tokens"])
        del models[rname]

    by = {r["row"]: r for r in rows}
    tps = {k: r["output_tok_s"] for k, r in by.items()}
    ratios = {"(b)/(a)": tps["(b)"] / tps["(a)"], "(c)/(b)": tps["(c)"] / tps["(b)"],
              "(d)/(b)": tps["(d)"] / tps["(b)"], "(d)/(a)": tps["(d)"] / tps["(a)"]}
    if "(s)" in tps:
        ratios["(s)/(s0)"] = tps["(s)"] / tps["(s0)"]
    if "(b′)" in tps:
        ratios["(b)/(b′)"] = tps["(b)"] / tps["(b′)"]
    good = [r for r in rows if "policy" in r and r["agreement"] >= 0.95]
    best = max(good, key=lambda r: r["output_tok_s"], default=None)
    if best:
        ratios["best policy at ≥95% agreement / (b)"] = best["output_tok_s"] / tps["(b)"]
    gpu = args.device.startswith("cuda")
    targets = {"(d)/(b)": 2.0 if gpu else 1.5, "best policy at ≥95% agreement / (b)": 2.0 if gpu else 1.5, "(s)/(s0)": 1.3}

    title = (f"recursify serving benchmark: {args.model}, student {args.student or 'UNTRAINED (lower bound)'}, "
             f"{args.requests} req @ {args.rate}/s, {args.prompt_len}+{args.output_len} tokens, {args.device}, "
             f"{args.threads} thread(s)")
    console.print(rows_table(rows, title))
    console.print(policy_table(rows, tps["(b)"]))
    for k, v in ratios.items():
        target = f"  (target ≥ {targets[k]:.1f}: {'met' if v >= targets[k] else 'NOT met'})" if k in targets else ""
        console.print(f"{k}: {v:.2f}{target}")
    if "(s)" in by:
        console.print(f"self-speculative: {by['(s)']['acceptance']:.1%} of loop-1 drafts accepted, "
                      f"{by['(s)']['tokens_per_round']:.2f} tokens per round, output identical to full depth: "
                      f"{by['(s)']['identical']:.0%} of requests")
    if best:
        console.print(f"best policy at ≥95% agreement: {best['row']} ({best['agreement']:.1%} agreement)")
    note = CPU_NOTE if not gpu else ""
    if not args.student:
        note += (" The student is converted on the fly (init=stepwise) and not uptrained, so its intermediate "
                 "predictions are poor: its rows are a lower bound; pass --student for a trained one.")
    console.print(note, style="dim")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    make_plot(rows, plot, args)
    policies = [{k: r[k] for k in ("row", "policy", "threshold", "output_tok_s", "agreement", "identical", "mean_exit_depth",
                                   "exit_checks", "exit_ms_per_step", "exit_us_per_check")} | {"x_b": r["output_tok_s"] / tps["(b)"]}
                for r in rows if "policy" in r]
    result = {
        "args": {k: (str(v) if k == "placement" else v) for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "platform": platform.platform(), "transformers": __import__("transformers").__version__},
        "student": args.student or "untrained (converted on the fly, lower bound)",
        "memory_budget_mb": budget / 2**20,
        "kv_slot_mb": slot_bytes / 2**20,
        "ratios": ratios,
        "targets": targets,
        "hf_batching": hf_note or ("measured" if args.hf_batching else "not run (--hf-batching)"),
        "policies": policies,
        "note": note,
        "rows": [{k: v for k, v in r.items() if k not in ("tokens", "exit_depths")} for r in rows],
        "plot": str(plot),
    }
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out} and {plot}")
