"""The same requests through vLLM and through recursify's own engine.

All requests arrive at once (greedy, fixed lengths) and are served to the end; the table gives the
output tokens per second of: vLLM serving the original model, vLLM serving the recursive checkpoint
(full depth, its out-of-tree model), and recursify's engine serving the original with continuous
sequence-wise batching (bench-serve's row (b)) and the recursive checkpoint with continuous
depth-wise batching (row (c)), at the same batch size. Run it in the venv `scripts/test_vllm.sh`
makes (vLLM beside recursify):

    .venv-vllm/bin/python benchmarks/vllm_serve.py --student runs/demo --out benchmarks/results/vllm_serve_cpu.json

Without --student, a 2-loop rank-64 conversion of the original (untrained) is served.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def vllm_row(folder: str, prompts: list[list[int]], output_len: int, max_batch: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_num_seqs=max_batch,
              max_model_len=max(len(p) for p in prompts) + output_len + 8)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:8])], SamplingParams(max_tokens=2), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    del llm
    gc.collect()
    return {"seconds": seconds, "output_tok_s": len(prompts) * output_len / seconds,
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def engine_row(model, prompts: list[list[int]], output_len: int, max_batch: int) -> dict:
    from recursify.engine import ExitConfig, LLMEngine, SamplingParams

    engine = LLMEngine(model, max_batch=max_batch, max_model_len=max(len(p) for p in prompts) + output_len + 8,
                       exit=ExitConfig("none"), max_queue=len(prompts) + 1)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=output_len, ignore_eos=True))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output_tok_s": len(prompts) * output_len / seconds, "tokens": [o.token_ids for o in outs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the original (bundled name or folder)")
    ap.add_argument("--student", default=None, help="a recursify checkpoint of --model")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/vllm_serve_cpu.json")
    args = ap.parse_args(argv)
    for flag in ("requests", "prompt_len", "output_len", "max_batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    import recursify as rf

    teacher, tok = rf.load_pretrained(args.model)
    work = Path(tempfile.mkdtemp(prefix="recursify-vllm-bench-"))
    teacher.save_pretrained(work / "original")
    tok.save_pretrained(work / "original")
    if args.student:
        student_dir = args.student
        student, _ = rf.load_pretrained(student_dir)
    else:
        student = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=64), progress=False)
        student_dir = str(work / "student")
        student.save_pretrained(student_dir)
        tok.save_pretrained(student_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, min(40000, teacher.config.vocab_size), (args.prompt_len,), generator=g).tolist()
               for _ in range(args.requests)]
    rows = {
        "vllm original": vllm_row(str(work / "original"), prompts, args.output_len, args.max_batch, args.dtype),
        "vllm recursive": vllm_row(student_dir, prompts, args.output_len, args.max_batch, args.dtype),
        "(b) engine original, sequence-wise batching": engine_row(
            rf.convert(teacher, rf.RecursionConfig(num_loops=1), progress=False), prompts, args.output_len, args.max_batch),
        "(c) engine recursive, depth-wise batching": engine_row(student, prompts, args.output_len, args.max_batch),
    }
    same = sum(a == b for a, b in zip(rows["vllm recursive"]["tokens"], rows["(c) engine recursive, depth-wise batching"]["tokens"]))
    print(f"{args.requests} requests of {args.prompt_len}+{args.output_len} tokens, batch {args.max_batch}, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    for name, r in rows.items():
        print(f"  {name:<46} {r['output_tok_s']:8.1f} tok/s")
    print(f"  vLLM's and the engine's greedy tokens agree on {same} of {args.requests} recursive requests")
    result = {"benchmark": "vllm_serve", "command": "python benchmarks/vllm_serve.py " + " ".join(argv or []),
              "machine": platform.processor() or platform.machine(), "args": vars(args), "same_tokens": same,
              "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
