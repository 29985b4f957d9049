"""Model-agnostic quality metrics for any Hugging Face causal LM (torch only).

These complement the lm-eval benchmarks (`recursify.eval.harness`) with the
cheap, dependency-free numbers that uptraining needs: held-out perplexity,
agreement with the teacher a recursive model was distilled from, a LAMBADA-style
cloze accuracy on held-out text, parameter counts and peak memory.

All functions accept a model whose ``forward(input_ids=..., attention_mask=...)``
returns an object with ``.logits`` of shape ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import math
import resource
import string
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch

from ..util.memory import LOGIT_ELEMENTS, ROW_ELEMENTS

SequencesLike = torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]

# Punctuation stripped from a cloze target word (ASCII plus common typographic marks).
_PUNCT = string.punctuation + "“”‘’«»…—–"


# A forward of the metrics below makes at most LOGIT_ELEMENTS logits ([batch, seq, vocab]; 2^26 fp32
# = 256 MB): the batch shrinks to fit (one sequence of Gemma 3's 262k vocabulary fills it), and
# softmax-level temporaries are made over ROW_ELEMENTS row chunks, so a large vocabulary costs time,
# not memory (the memory planner counts the same constants).


def _fit_batch(model: torch.nn.Module, batch_size: int, width: int) -> int:
    """`batch_size`, lowered so that a batch's logits stay within LOGIT_ELEMENTS."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return max(1, min(batch_size, LOGIT_ELEMENTS // max(1, width * vocab)))


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def _eval_mode(*models: torch.nn.Module):
    """Score in eval mode (no dropout) and restore each model's previous mode afterwards."""
    previous = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, was_training in zip(models, previous):
            m.train(was_training)


def _as_sequences(data: SequencesLike) -> list[torch.Tensor]:
    """Normalise a 1-D stream, a 2-D batch or a list of sequences into 1-D LongTensors."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            return [data.long()]
        if data.dim() == 2:
            return [row.long() for row in data]
        raise ValueError(f"expected a 1-D or 2-D tensor of token ids, got shape {tuple(data.shape)}")
    return [torch.as_tensor(seq, dtype=torch.long).reshape(-1) for seq in data]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _pad_right(seqs: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad so that position ids (0..len-1) stay correct without passing them explicitly."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _batched(items: list, batch_size: int) -> Iterable[list]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


# --------------------------------------------------------------------------- perplexity


def sliding_windows(seq_len: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, n_scored)`` of the HF perplexity guide's strided evaluation.

    Each window covers ``[begin, end)`` and scores only its last ``n_scored``
    tokens (those no earlier window scored), so no token is counted twice and,
    once the first window is full, each has at least ``context_len - stride``
    tokens of context.  With ``stride < context_len`` every token but the first
    is scored exactly once (``sum(n_scored) == seq_len - 1``).  With
    ``stride == context_len`` the windows are disjoint chunks and, as in the
    guide, the first token of each chunk is not scored (it has no context).
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + context_len, seq_len)
        # a window's first token is never a target: nothing inside the window precedes it
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append((begin, end, n_scored))
        prev_end = end
        if end == seq_len:
            break
    return windows


def perplexity(
    model: torch.nn.Module,
    tokens: SequencesLike,
    context_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Strided sliding-window perplexity of ``tokens`` (a held-out stream or several sequences).

    ``tokens`` is a 1-D LongTensor (one stream), a 2-D tensor or a list of
    sequences (each scored independently, i.e. no context crosses a boundary).
    ``context_len`` defaults to the model's ``max_position_embeddings``;
    ``stride`` defaults to ``context_len // 2``.  Returns ``nll`` (mean per
    scored token, nats), ``ppl = exp(nll)`` and ``tokens`` (number scored).
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context_len is None:
        if max_pos is None:
            raise ValueError("context_len is required for models without config.max_position_embeddings")
        context_len = int(max_pos)
    if max_pos is not None and context_len > max_pos:
        raise ValueError(f"context_len={context_len} exceeds the model's max_position_embeddings={max_pos}")
    stride = stride or max(1, context_len // 2)

    # (window ids, number of trailing tokens to score) for every sequence.
    jobs: list[tuple[torch.Tensor, int]] = []
    for seq in _as_sequences(tokens):
        for begin, end, n_scored in sliding_windows(len(seq), context_len, stride):
            jobs.append((seq[begin:end], n_scored))
    # Group equal-length windows (almost all of them) so batches need no padding.
    jobs.sort(key=lambda job: -len(job[0]))

    device = _device_of(model)
    total_nll, total_tokens = 0.0, 0
    batch_size = _fit_batch(model, batch_size, len(jobs[0][0]) if jobs else 1)
    with _eval_mode(model):
        for batch in _batched(jobs, batch_size):
            ids, mask = _pad_right([w for w, _ in batch], device)
            logits = _logits(model, ids, mask)
            for row, (window, n_scored) in enumerate(batch):
                length = len(window)
                # logits at position t predict token t + 1; only the scored slice is normalised
                pred = torch.log_softmax(logits[row, length - 1 - n_scored : length - 1].float(), dim=-1)
                target = ids[row, length - n_scored : length]
                total_nll -= pred.gather(-1, target[:, None]).sum().item()
                total_tokens += n_scored
    if total_tokens == 0:
        raise ValueError("nothing to score: every sequence needs at least 2 tokens")
    nll = total_nll / total_tokens
    return {"nll": nll, "ppl": math.exp(nll), "tokens": total_tokens}


# --------------------------------------------------------------------------- distillation


def teacher_agreement(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    sequences: SequencesLike,
    batch_size: int = 8,
) -> dict:
    """How closely the student's next-token distributions follow the teacher's.

    Returns ``kl``: mean forward KL(teacher || student) per token position in
    nats (the distillation objective), ``top1_agreement``: fraction of
    positions where both argmax predictions coincide, and ``tokens``.
    Every position of every sequence is a prediction, padding excluded.
    """
    seqs = [s for s in _as_sequences(sequences) if len(s) > 0]
    s_device, t_device = _device_of(student), _device_of(teacher)
    kl_sum = agree = torch.zeros((), dtype=torch.float64, device=s_device)
    count = 0
    batch_size = _fit_batch(student, batch_size, max((len(s) for s in seqs), default=1))
    with _eval_mode(student, teacher):
        for batch in _batched(seqs, batch_size):
            ids, mask = _pad_right(batch, s_device)
            s_logits = _logits(student, ids, mask)
            t_logits = _logits(teacher, ids.to(t_device), mask.to(t_device)).to(s_logits.device)
            if s_logits.shape[-1] != t_logits.shape[-1]:
                raise ValueError(
                    f"student and teacher vocabularies differ ({s_logits.shape[-1]} vs {t_logits.shape[-1]})"
                )
            valid = mask.bool()  # drop padding before the float32 softmax: [n_tokens, vocab]
            s_rows, t_rows = s_logits[valid], t_logits[valid]
            del s_logits, t_logits
            step = max(1, ROW_ELEMENTS // s_rows.shape[-1])
            for a in range(0, len(s_rows), step):
                s_logp = torch.log_softmax(s_rows[a : a + step].float(), dim=-1)
                t_logp = torch.log_softmax(t_rows[a : a + step].float(), dim=-1)
                kl_sum = kl_sum + torch.nn.functional.kl_div(s_logp, t_logp, reduction="sum", log_target=True).double()
                agree = agree + (s_logp.argmax(-1) == t_logp.argmax(-1)).sum()
            count += len(s_rows)
    if count == 0:
        raise ValueError("no tokens to compare")
    return {"kl": kl_sum.item() / count, "top1_agreement": agree.item() / count, "tokens": count}


def confidence_exit_curve(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    sequences: SequencesLike,
    thresholds: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.01),
    batch_size: int = 8,
) -> list[dict]:
    """Average exit depth against top-1 agreement with the teacher, for confidence-based exits.

    Every token exits at the first loop whose top-1 probability reaches the threshold (the last
    loop always answers), which is the serving engine's `confidence` rule applied offline to all
    exits of one forward. Threshold 0 exits everything after loop 1; above 1 nothing exits early.
    Returns one ``{"threshold", "mean_loops", "agreement"}`` per threshold.
    """
    seqs = [s for s in _as_sequences(sequences) if len(s) > 0]
    loops = model.layout.num_loops
    device, t_device = _device_of(model), _device_of(teacher)
    conf, pred, target = [], [], []
    with _eval_mode(model, teacher):
        for batch in _batched(seqs, batch_size):
            ids, mask = _pad_right(batch, device)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_loop_states=True)
            valid = mask.bool()
            per_loop = [torch.softmax(model.exit_logits(h)[valid].float(), -1).max(-1) for h in out.loop_hidden_states]
            conf.append(torch.stack([p.values for p in per_loop]))  # [loops, tokens]
            pred.append(torch.stack([p.indices for p in per_loop]))
            target.append(_logits(teacher, ids.to(t_device), mask.to(t_device))[valid.to(t_device)].argmax(-1).to(device))
    conf, pred, target = torch.cat(conf, 1), torch.cat(pred, 1), torch.cat(target)
    curve = []
    for tau in thresholds:
        reached = conf >= tau
        reached[-1] = True  # the last loop always answers
        exit_loop = reached.float().argmax(0)  # first loop that is confident enough
        chosen = pred.gather(0, exit_loop[None]).squeeze(0)
        curve.append({"threshold": float(tau), "mean_loops": float(exit_loop.float().mean()) + 1,
                      "agreement": float((chosen == target).float().mean()), "loops": loops})
    return curve


# --------------------------------------------------------------------------- cloze accuracy


def cloze_items(passages: Iterable[str], n: int, min_words: int = 50) -> list[tuple[str, str]]:
    """``(context, target)`` pairs from the first ``n`` suitable passages, in order.

    Suitable: at least ``min_words`` whitespace-separated words and a last word
    that is non-empty once punctuation is stripped.  Context is every word but
    the last, joined by single spaces; the target is the stripped last word.
    Taking passages in order keeps the selection deterministic.
    """
    items = []
    for passage in passages:
        if len(items) >= n:
            break
        words = passage.split()
        if len(words) < min_words:
            continue
        target = words[-1].strip(_PUNCT)
        if not target:
            continue
        items.append((" ".join(words[:-1]), target))
    return items


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenise like lm-eval: encode the whole string and split off the continuation's tokens."""
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def cloze_accuracy(
    model: torch.nn.Module,
    tokenizer,
    passages: Iterable[str],
    n: int = 500,
    batch_size: int = 8,
    max_length: int | None = None,
    min_words: int = 50,
) -> dict:
    """LAMBADA-style last-word accuracy on held-out real text.

    A passage counts as correct when greedy decoding reproduces every token of
    `` " " + target`` given the context, exactly like lm-eval's lambada ``acc``
    (``is_greedy``).  Contexts longer than ``max_length`` (default: the model's
    ``max_position_embeddings``) are truncated from the left.
    Returns ``acc``, ``correct`` and ``n`` (the number of passages scored).
    """
    items = cloze_items(passages, n, min_words=min_words)
    if not items:
        raise ValueError(f"no passage with >= {min_words} words and a non-empty last word")
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048

    examples = []  # (input ids, number of continuation tokens)
    for context, target in items:
        ctx, cont = _encode_pair(tokenizer, context, " " + target)
        ids = (ctx + cont)[:-1][-max_length:]  # the last token is only a target
        examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(cont, dtype=torch.long)))

    device = _device_of(model)
    correct = 0
    with _eval_mode(model):
        for batch in _batched(examples, batch_size):
            ids, mask = _pad_right([x for x, _ in batch], device)
            greedy = _logits(model, ids, mask).argmax(-1)
            for row, (inp, cont) in enumerate(batch):
                pred = greedy[row, len(inp) - len(cont) : len(inp)].cpu()
                correct += bool(torch.equal(pred, cont))
    return {"acc": correct / len(examples), "correct": correct, "n": len(examples)}


# --------------------------------------------------------------------------- resources


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied/shared weights counted once).

    Counting distinct tensors matters for recursive models, whose looped
    blocks reuse one set of weights.  ``exclude_embeddings`` drops the input
    embedding and (if untied) the LM head, the convention for "non-embedding
    parameters".
    """
    skip: set[int] = set()
    if exclude_embeddings:
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, getter, lambda: None)()
            if module is not None:
                skip.update(id(p) for p in module.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def peak_memory() -> dict:
    """Peak memory of this process: host RSS and, when CUDA is in use, allocated GPU memory (bytes).

    RSS is the kernel's high-water mark (``getrusage``), so it includes
    everything the process ever held, not just the model.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    cuda_bytes = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_bytes = int(torch.cuda.max_memory_allocated())
    return {"rss_bytes": int(rss_bytes), "cuda_bytes": cuda_bytes}
