"""recursify.eval.metrics against independent hand computations on tiny models."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from recursify.eval.metrics import (
    cloze_accuracy,
    cloze_items,
    count_parameters,
    peak_memory,
    perplexity,
    sliding_windows,
    teacher_agreement,
)
from tiny_models import bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A recursive transformer shares one block of layers across depth.",
    "She opened the door, looked at the garden and smiled at her brother.",
    "Evaluation needs held-out text that the model has never seen before.",
    "Numbers like 1, 2, 3 and words like apple, river, mountain appear here.",
]


def tiny_tokenizer():
    return bpe_tokenizer(CORPUS, vocab_size=320)


def tiny_llama(vocab_size: int, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # peaky predictions, so argmax-based checks are meaningful
    )
    return LlamaForCausalLM(config).eval()


class Bigram(torch.nn.Module):
    """A model whose logits depend only on the current token: easy to compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=97)


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 97, (203,), generator=torch.Generator().manual_seed(1))


def hand_chunk_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token CE inside one chunk (standard shifted LM loss)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item(), len(ids) - 1


def hf_guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the HF perplexity guide (labels masked with -100), summed over tokens."""
    seq_len, prev_end, nll, count = len(ids), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        valid = shift_labels != -100
        nll += F.cross_entropy(shift_logits[valid], shift_labels[valid], reduction="sum").item()
        count += int(valid.sum())
        prev_end = end
        if end == seq_len:
            break
    return nll, count


def test_perplexity_disjoint_chunks_equals_mean_ce(model, stream):
    ctx = 32
    nll, count = 0.0, 0
    for start in range(0, len(stream), ctx):
        chunk = stream[start : start + ctx]
        if len(chunk) > 1:
            n, c = hand_chunk_nll(model, chunk)
            nll, count = nll + n, count + c
    out = perplexity(model, stream, context_len=ctx, stride=ctx, batch_size=3)
    assert out["tokens"] == count
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_single_window_is_plain_ce(model, stream):
    ids = stream[:50]
    nll, count = hand_chunk_nll(model, ids)
    out = perplexity(model, ids, context_len=64, stride=16)
    assert out["tokens"] == 49
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("ctx,stride", [(32, 8), (32, 31), (17, 5), (8, 1)])
def test_perplexity_strided_scores_each_token_once(model, stream, ctx, stride):
    out = perplexity(model, stream, context_len=ctx, stride=stride, batch_size=4)
    assert out["tokens"] == len(stream) - 1
    nll, count = hf_guide_nll(model, stream, ctx, stride)
    assert count == len(stream) - 1
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)


def test_perplexity_batch_size_invariant_and_multiple_sequences(model, stream):
    seqs = [stream[:40], stream[40:41], stream[41:120], stream[120:]]
    a = perplexity(model, seqs, context_len=16, stride=4, batch_size=1)
    b = perplexity(model, seqs, context_len=16, stride=4, batch_size=7)
    assert a["tokens"] == b["tokens"] == sum(len(s) - 1 for s in seqs)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_perplexity_context_independent_model_matches_full_sequence():
    # A bigram model ignores context, so every stride must give the full-sequence CE.
    table = torch.randn(11, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 11, (60,), generator=torch.Generator().manual_seed(2))
    expected = F.cross_entropy(table[ids[:-1]], ids[1:]).item()
    for stride in (1, 3, 9):
        assert perplexity(Bigram(table), ids, context_len=10, stride=stride)["nll"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_respects_context_length(model, stream):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, stream, context_len=512, stride=256)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, stream, context_len=16, stride=32)
    assert all(end - begin <= 16 for begin, end, _ in sliding_windows(500, 16, 3))


def test_teacher_agreement_with_itself(model, stream):
    seqs = [stream[:30], stream[30:45], stream[45:100]]
    out = teacher_agreement(model, model, seqs, batch_size=2)
    assert out["tokens"] == 30 + 15 + 55
    assert out["top1_agreement"] == 1.0
    assert abs(out["kl"]) < 1e-6


def test_teacher_agreement_matches_hand_kl():
    gen = torch.Generator().manual_seed(3)
    student_t, teacher_t = torch.randn(5, 5, generator=gen), torch.randn(5, 5, generator=gen)
    seqs = [[0, 1, 2, 3], [4, 4], [2]]
    kl_sum, agree, count = 0.0, 0, 0
    for seq in seqs:
        for tok in seq:
            zs, zt = student_t[tok].tolist(), teacher_t[tok].tolist()
            ls = [z - math.log(sum(math.exp(x) for x in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(x) for x in zt)) for z in zt]
            kl_sum += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
            agree += zs.index(max(zs)) == zt.index(max(zt))
            count += 1
    out = teacher_agreement(Bigram(student_t), Bigram(teacher_t), seqs, batch_size=2)
    assert out["tokens"] == count
    assert out["kl"] == pytest.approx(kl_sum / count, rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(agree / count)
    assert out["kl"] > 0


def test_cloze_items_selection():
    long = " ".join(f"w{i}" for i in range(60))
    passages = ["too short passage.", long + " final,", long + ' "Target!"', long + " ...", long + " last"]
    items = cloze_items(passages, n=2)
    assert items == [(long, "final"), (long, "Target")]
    assert cloze_items(passages, n=10)[-1] == (long, "last")  # "..." has no word left
    assert len(cloze_items(passages, n=10)) == 3


def test_cloze_accuracy_matches_greedy_decoding():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=4)
    # Memorise the corpus a little so that some (not all) last words are predicted correctly.
    ids = tok(" ".join(CORPUS * 2), return_tensors="pt")["input_ids"][:, :256]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    base = " ".join(CORPUS * 2).split()
    passages = [" ".join(base[i : i + 55]) for i in range(0, 40, 4)]
    out = cloze_accuracy(model, tok, passages, n=8, batch_size=3)
    correct = 0
    for context, target in cloze_items(passages, 8):
        ids = tok(context)["input_ids"]
        cont = tok(context + " " + target)["input_ids"][len(ids) :]
        with torch.no_grad():  # autoregressive greedy generation, one token at a time
            gen = list(ids)
            for _ in cont:
                gen.append(int(model(input_ids=torch.tensor([gen])).logits[0, -1].argmax()))
        correct += gen[len(ids) :] == cont
    assert out["n"] == 8
    assert 0 < correct < 8, "the check below should see both outcomes"
    assert out["correct"] == correct
    assert out["acc"] == correct / 8


def test_count_parameters_and_memory():
    tied, untied = tiny_llama(97, tie=True), tiny_llama(97, tie=False)
    emb = 97 * 64
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())
    assert count_parameters(untied) - count_parameters(tied) == emb  # the tied head is counted once
    assert count_parameters(tied, exclude_embeddings=True) == count_parameters(tied) - emb
    assert count_parameters(untied, exclude_embeddings=True) == count_parameters(untied) - 2 * emb
    mem = peak_memory()
    assert mem["rss_bytes"] > 10 * 2**20


def test_check_causal_accepts_decoders_and_rejects_an_encoder():
    import recursify as rf
    from recursify.hub import ModelLoadError, check_causal
    from tiny_models import make
    from transformers import BertConfig, BertLMHeadModel

    for name in ("llama", "gemma3", "gpt_neox"):
        check_causal(make(name).eval(), name)
    check_causal(rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False), "recursive")
    bert = BertLMHeadModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=40)).eval()
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        check_causal(bert, "bert")
