"""What `recursify compress` measures at the end and how it reads: the models side by side on the
same held-out text (perplexity, agreement with the teacher, greedy generations, optionally the
paper's seven benchmarks), and `summary.md`, whose every sentence is computed from those numbers.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import RecursionConfig
from .config import fmt_seconds
from .state import RunState

PROMPTS = ("The capital of France is", "def fibonacci(n):\n   ", "The most important thing about a list is")
LABELS = {"teacher": "teacher", "student": "compressed", "baseline": "plain model, same size and training"}


DECODE_TOKENS = 16  # tokens generated per decode-speed measurement, after a 16-token prompt
MAX_DECODE_BATCH = 16


@torch.no_grad()
def decode_speed(model, batch: int, vocab: int) -> float:
    """Greedy decode tokens/s at `batch` sequences with HF `generate()` on the model's device: the
    time of DECODE_TOKENS new tokens less that of the first (the prefill), so prefill is left out."""
    import time

    from ..util.device import synchronize

    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        synchronize(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return batch * (DECODE_TOKENS - 1) / max(timed(DECODE_TOKENS) - timed(1), 1e-9)


def costs(models: dict) -> dict:
    """Per model: weight bytes, multiply-adds per token (linears and head, `allocate.macs_per_token`)
    and greedy decode speed at batch 1 and at the largest batch (up to 16) whose KV cache fits half
    the device's free memory beside the teacher, measured on the device the models are on."""
    from ..conversion.allocate import macs_per_token
    from ..engine.kv_cache import KVCache
    from ..families import arch_from_config, detect_family
    from ..util.device import free_memory

    teacher = models["teacher"]
    weight = next(teacher.parameters())
    c = teacher.config.get_text_config()
    a = arch_from_config(detect_family(c), c)
    kv_per_seq = KVCache.bytes_per_slot(a.num_layers, a.num_kv_heads, a.head_dim, 2 * DECODE_TOKENS, weight.dtype)
    batch = max(1, min(MAX_DECODE_BATCH, int(free_memory(weight.device) // 2 // kv_per_seq)))
    device = weight.device
    out = {}
    for name, model in models.items():
        # A recursive model's multiply-adds from its layout over the teacher's shapes; a plain one's own.
        recursion = getattr(model, "recursion", None)
        macs = macs_per_token(model) if recursion is None else macs_per_token(teacher, recursion)
        out[name] = {"weight_bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
                     "macs_per_token": macs, "decode_batch": batch, "device": str(device),
                     "decode_tok_s": {"1": decode_speed(model, 1, c.vocab_size),
                                      str(batch): decode_speed(model, batch, c.vocab_size)}}
    return out


@torch.no_grad()
def measure(models: dict, tok, stream: torch.Tensor, seq_len: int, paper_items: int,
            log: Callable[[str], None] = print) -> dict:
    """Per model (the teacher first): held-out perplexity, agreement with the teacher, generations,
    and with `paper_items` > 0 the seven benchmarks on their first `paper_items` items."""
    from ..eval.metrics import perplexity, teacher_agreement

    teacher = models["teacher"]
    device = next(teacher.parameters()).device
    seqs = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    res: dict = {"ppl": {}, "agreement": {}, "generations": [], "paper": {}}
    for name, model in models.items():
        if name != "teacher":
            res["ppl"][name] = perplexity(model, stream, context_len=seq_len, stride=seq_len)["ppl"]
            res["agreement"][name] = teacher_agreement(model, teacher, seqs)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        pair = {"prompt": prompt}
        for name, model in models.items():
            seq = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            pair[name] = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
        res["generations"].append(pair)
    res["cost"] = costs(models)
    if paper_items:
        import warnings

        from ..eval.harness import run_paper_tasks

        for name, model in models.items():
            log(f"      the paper's seven tasks, first {paper_items} items each: {LABELS[name]}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paper = run_paper_tasks(model, tokenizer=tok, limit=paper_items, batch_size=8, device=str(device))
            res["paper"][name] = {"average": paper["average"],
                                  "tasks": {k: v["value"] for k, v in paper["tasks"].items()}}
    return res


def build_summary(cfg: dict, state: RunState, m: dict, models: dict, heldout_tokens: int, seconds: float) -> dict:
    """summary.json: the run's settings and sizes, the compress state's record of each stage, and
    what `measure` found for each model."""
    teacher, student = models["teacher"], models["student"]
    params_teacher = sum(p.numel() for p in teacher.parameters())
    params_student = student.parameter_breakdown()["total"]
    summary = {
        "model": cfg["model"], "config": cfg, "recursion": student.recursion.to_dict(),
        "params": {"teacher": params_teacher, "student": params_student,
                   "fraction": params_student / params_teacher},
        "heldout_tokens": heldout_tokens,
        "ppl": {"teacher": state.teacher_ppl, "converted": state.before, "after_local": state.after_local,
                "student": m["ppl"]["student"]},
        "local_tokens": state.local_tokens,
        "top1_agreement": m["agreement"]["student"]["top1_agreement"], "kl": m["agreement"]["student"]["kl"],
        "train_tokens": state.train_tokens, "train_steps": state.train_steps,
        "train_tokens_per_s": state.train_tok_s, "train_seconds": state.train_seconds,
        "seconds": seconds, "generations": m["generations"], "paper": m["paper"] or None,
        "layout_search": state.layout_search, "cost": m.get("cost"),
    }
    if "baseline" in models:
        b = models["baseline"]
        summary["baseline"] = {"layers": b.config.num_hidden_layers, "params": sum(p.numel() for p in b.parameters()),
                               "ppl": m["ppl"]["baseline"], "top1_agreement": m["agreement"]["baseline"]["top1_agreement"],
                               "kl": m["agreement"]["baseline"]["kl"], "train_tokens": state.baseline_tokens,
                               "lr": state.baseline_lr}
    return summary


def _ranks(recursion: dict) -> str:
    r = RecursionConfig.from_dict(recursion)
    return ("LoRA ranks " if r.rank_pattern else "LoRA rank ") + r.rank_text


def _recipe(cfg: dict) -> str:
    """One line: what the distillation optimised and trained."""
    parts = ["KD on the logits"]
    if cfg.get("hidden_weight"):
        parts.append(f"hidden-state distillation at weight {cfg['hidden_weight']:g}")
    if cfg.get("exit_schedule", "none") != "none":
        parts.append(f"{cfg['exit_schedule']} early-exit losses")
    trains = "everything but the embedding and head" if cfg.get("trainable") == "body" else "every weight"
    return f"Distillation: {' + '.join(parts)}, lr {cfg['lr']:g}, training {trains}."


def render_summary(s: dict) -> str:
    """The summary table; every sentence is computed from the numbers in `s`."""
    p, ppl = s["params"], s["ppl"]
    ratio = ppl["student"] / ppl["teacher"]
    gain = ppl["converted"] / ppl["student"]
    base = s.get("baseline")
    calibration = s["recursion"].get("calibration") or {}
    lines = [
        f"# {s['model']} compressed by recursify",
        "",
        f"{s['recursion']['num_loops']} loops ({s['recursion']['strategy']}), {_ranks(s['recursion'])}, "
        f"calibrated on {calibration.get('tokens', 0)} tokens"
        f"{' with the output curvature' if calibration.get('curvature_tokens') else ''}"
        f"{' with a sequential refit' if calibration.get('sequential') else ''}, "
        f"{s['train_tokens'] or 0} distillation tokens, {fmt_seconds(s['seconds'])} in all.",
        _recipe(s.get("config") or {}),
    ]
    if s.get("layout_search"):
        found = sorted(s["layout_search"], key=lambda c: c["ppl"])
        lines.append(f"Loops and rank chosen among {len(found)} layouts that fit "
                     f"{s['config']['target_params']:.0%} of the teacher, by converted perplexity on training text "
                     "(lower is better): " + "; ".join(f"{c['loops']} loops, rank {c['rank']}: {c['ppl']:.4g}"
                                                        for c in found) + ".")
    lines += [
        "",
        "| model | params | held-out ppl | top-1 agreement |",
        "|---|---:|---:|---:|",
        f"| teacher | {p['teacher'] / 1e6:.1f}M | {ppl['teacher']:.2f} | 1 |",
        f"| converted, before training | {p['student'] / 1e6:.1f}M | {ppl['converted']:.4g} | – |",
    ]
    if ppl.get("after_local") is not None:
        lines.append(f"| after local distillation ({s['local_tokens']} tokens) | {p['student'] / 1e6:.1f}M | "
                     f"{ppl['after_local']:.4g} | – |")
    lines.append(f"| compressed | {p['student'] / 1e6:.1f}M ({p['fraction']:.0%}) | {ppl['student']:.2f} | "
                 f"{s['top1_agreement']:.3f} |")
    if base:
        lr = f", lr {base['lr']:g}" if base.get("lr") else ""
        lines.append(f"| plain {base['layers']}-layer model, same training time ({base['train_tokens']} tokens{lr}) | "
                     f"{base['params'] / 1e6:.1f}M ({base['params'] / p['teacher']:.0%}) | {base['ppl']:.2f} | "
                     f"{base['top1_agreement']:.3f} |")
    lines += [
        "",
        f"Top-1 agreement with the teacher: {s['top1_agreement']:.3f} (KL {s['kl']:.3f} nats/token) on "
        f"{s['heldout_tokens']} held-out tokens. The compressed model's perplexity is {ratio:.2f}x the teacher's; "
        f"training lowered it {gain:.3g}-fold from the converted model's.",
    ]
    if base:
        side = "below" if ppl["student"] < base["ppl"] else "above"
        lines[-1] += (f" It is {side} the parameter-matched plain model's ({ppl['student']:.2f} against "
                      f"{base['ppl']:.2f}: {ppl['student'] / base['ppl']:.2f}x).")
    cost = s.get("cost")
    if cost:
        b = next(iter(cost.values()))["decode_batch"]
        lines += ["", f"Cost on {cost['teacher']['device']} (decode: greedy tokens/s after a 16-token prompt):", "",
                  f"| model | weights | multiply-adds per token | decode, batch 1 | decode, batch {b} |",
                  "|---|---:|---:|---:|---:|"]
        for who, r in cost.items():
            lines.append(f"| {LABELS[who]} | {r['weight_bytes'] / 2**20:.0f} MiB | {r['macs_per_token'] / 1e6:.1f}M | "
                         f"{r['decode_tok_s']['1']:.1f} | {r['decode_tok_s'][str(b)]:.1f} |")
        t, st = cost["teacher"], cost["student"]
        lines += ["", f"The compressed model holds {st['weight_bytes'] / t['weight_bytes']:.2f}x the teacher's weight "
                      f"bytes, does {st['macs_per_token'] / t['macs_per_token']:.2f}x its multiply-adds per token and "
                      f"decodes at {st['decode_tok_s']['1'] / t['decode_tok_s']['1']:.2f}x its speed at batch 1 and "
                      f"{st['decode_tok_s'][str(b)] / t['decode_tok_s'][str(b)]:.2f}x at batch {b}."]
    paper = s.get("paper") or {}
    if paper:
        from ..eval.harness import DISPLAY_NAMES

        names = list(paper["teacher"]["tasks"])
        lines += ["", f"The paper's seven benchmarks, first {s['config']['paper_tasks']} items each:", "",
                  "| model | " + " | ".join(DISPLAY_NAMES.get(n, n) for n in names) + " | average |",
                  "|---|" + "---:|" * (len(names) + 1)]
        for who, r in paper.items():
            lines.append(f"| {LABELS[who]} | " + " | ".join(f"{100 * r['tasks'][n]:.1f}" for n in names)
                         + f" | {100 * r['average']:.1f} |")
        gap = 100 * (paper["teacher"]["average"] - paper["student"]["average"])
        lines += ["", f"The compressed model's average is {gap:.1f} points below the teacher's."]
    lines += ["", "| prompt | " + " | ".join(LABELS[k] for k in ("teacher", "student", "baseline")
                                             if k in s["generations"][0]) + " |",
              "|---|---|---|" + ("---|" if base else "")]
    esc = lambda t: t.replace("|", "\\|").replace("\n", "⏎")  # noqa: E731
    for g in s["generations"]:
        lines.append(f"| {esc(g['prompt'])} | " + " | ".join(esc(g[k]) for k in ("teacher", "student", "baseline")
                                                           if k in g) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["PROMPTS", "build_summary", "measure", "render_summary"]
