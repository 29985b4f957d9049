"""One call that answers the GPU questions: the device-parametrised tests on the card, a short
bf16 `compress` of SmolLM2, and `bench-serve` rows (a)-(e) on the student it made, gathered into
one JSON that names the card. `scripts/gpu_check.sh` installs and then runs this.

    python benchmarks/gpu_check.py --out gpu_check.json                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json  # the same steps on the CPU,
                                                                        # at toy sizes (CI runs this)

Each step is a subprocess with its own time limit; a failed step is recorded (its last lines) and
the others still run, so one call always brings back everything it could measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TESTS = "tests/test_device.py"


def run(name: str, cmd: list[str], limit: float, env: dict, steps: list) -> dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    step = {"step": name, "command": " ".join(cmd), "exit_code": code, "seconds": round(time.monotonic() - t0, 1),
            "tail": out.strip().splitlines()[-15:]}
    print("\n".join(step["tail"][-5:]), flush=True)
    steps.append(step)
    return step


def tiny_teacher(folder: Path) -> str:
    """A 4-layer random Llama with SmolLM2's tokenizer (the dry run's stand-in for SmolLM2)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recursify.hub import resolve

    tok_dir, gguf = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(tok_dir, gguf_file=gguf)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run every step on the CPU at toy sizes (no GPU needed)")
    ap.add_argument("--budget", default="5m", help="compress's time budget")
    ap.add_argument("--data", default=None, help="training text (default: corpus/python-docs/train; the dry run: "
                    "the paragraphs of this checkout's README.md and docs/, held out on docs/ARCHITECTURE.md's: no download)")
    ap.add_argument("--work", default=None, help="folder for the student and the step outputs")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to run the steps on the CPU", file=sys.stderr)
        return 2
    device, dtype = ("cpu", "float32") if args.dry_run else ("cuda", "bfloat16")
    work = Path(args.work or tempfile.mkdtemp(prefix="recursify-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RECURSIFY_TEST_DEVICE": device, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    py, cli = sys.executable, [sys.executable, "-m", "recursify"]
    steps: list[dict] = []
    t0 = time.monotonic()

    tests = [py, "-m", "pytest", "-q", "-x", DEVICE_TESTS, "-p", "no:cacheprovider"]
    if args.dry_run:
        tests += ["-k", "sync or reads or bad_device"]
    run("tests", tests, 240, env, steps)

    model = tiny_teacher(work / "teacher") if args.dry_run else "smollm2-135m"
    student = work / "student"
    data, heldout = args.data or "corpus/python-docs/train", []
    if args.dry_run and not args.data:  # text that every checkout has, one JSONL document per paragraph
        train = sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name != "ARCHITECTURE.md") + [ROOT / "README.md"]
        for name, files in (("train", train), ("heldout", [ROOT / "docs" / "ARCHITECTURE.md"])):
            paragraphs = [p for f in files for p in f.read_text().split("\n\n") if len(p) > 80]
            (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
        data, heldout = str(work / "train.jsonl"), ["--heldout", str(work / "heldout.jsonl")]
    compress = cli + ["compress", model, "--data", data, *heldout, "--out", str(student), "--loops", "2",
                      "--lora-rank", "8" if args.dry_run else "64", "--time-budget", "2m" if args.dry_run else args.budget,
                      "--device", device, "--dtype", dtype, "--overwrite", "--no-curvature", "--no-sequential"]
    if args.dry_run:
        compress += ["--calib-tokens", "1024", "--eval-tokens", "512", "--seq-len", "128", "--max-tokens", "1024"]
    run("compress", compress, 480, env, steps)

    bench_json = work / "bench_serve.json"
    bench = cli + ["bench-serve", "--model", model, "--student", str(student), "--device", device, "--dtype", dtype,
                   "--out", str(bench_json), "--requests", "4" if args.dry_run else "24", "--prompt-len", "32",
                   "--output-len", "8" if args.dry_run else "32", "--rate", "inf", "--threads", "1" if args.dry_run else "8"]
    if args.dry_run:
        bench += ["--thresholds", "0.9", "--entropy-thresholds", "", "--saturation-thresholds", ""]
    run("bench-serve", bench, 300, env, steps)

    summary = json.loads((student / "summary.json").read_text()) if (student / "summary.json").exists() else None
    bench_rows = json.loads(bench_json.read_text())["rows"] if bench_json.exists() else None
    result = {
        "benchmark": "gpu_check", "dry_run": args.dry_run, "device": device, "dtype": dtype,
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else platform.processor(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": round(time.monotonic() - t0, 1),
        "steps": steps, "compress": {k: summary[k] for k in ("ppl", "agreement", "train", "params") if k in summary}
        if summary else None, "bench_serve": bench_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    failed = [s["step"] for s in steps if s["exit_code"] != 0]
    if not args.work:  # its own temporary folder: the models and checkpoints go with it
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} in {result['seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "; all steps passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
