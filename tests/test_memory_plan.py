"""compress's memory plan: gradient checkpointing and the output curvature given up to fit, a run
that cannot fit refused before any work; multiply-adds per token counted by hand; gradient
checkpointing gives the same gradients."""

from __future__ import annotations

import pytest
import torch
from test_compress import cfg, teacher_dir  # noqa: F401 - the module-scoped fixture
from tiny_models import make

import recursify as rf
import recursify.util.device as device_util
from recursify.compress import CompressError, compress

pytestmark = pytest.mark.usefixtures("one_thread")


def _free(monkeypatch, nbytes: int):
    monkeypatch.setattr(device_util, "free_memory", lambda device: nbytes)


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(teacher_dir, tmp_path, monkeypatch):  # noqa: F811
    _free(monkeypatch, 64 * 2**20)  # 64 MiB: less than the interpreter itself is planned to take
    lines = []
    with pytest.raises(CompressError) as e:
        compress(cfg(teacher_dir, tmp_path / "out"), log=lines.append)
    message = str(e.value)
    assert "needs about" in message and "usable on cpu" in message and "try" in message
    assert len(message.splitlines()) == 1
    assert any(line.startswith("memory plan (estimated peaks): calibrate") for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_checkpointing_then_the_curvature_are_given_up_to_fit(monkeypatch):
    """Shapes where distillation's activations decide the peak (8 x 512 tokens, 8 layers)."""
    from transformers import LlamaConfig

    from recursify.budget import HEADROOM, fit_memory
    from recursify.util.device import resolve_placement

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2)
    recursion = rf.RecursionConfig(num_loops=2, lora_rank=8)
    where = resolve_placement("cpu", "float32")
    args = dict(batch=8, seq_len=512, calib_tokens=4096, placement=where, target_params=None)

    def fit(free, **kw):
        _free(monkeypatch, int(free / HEADROOM) + 1)
        return fit_memory(config, recursion, **args, **kw)

    plain = fit(2**50, curvature=True, checkpointing="off")[0]  # ample memory: the plans as asked
    ckpt = fit(2**50, curvature=True, checkpointing="on")[0]
    assert plain.peak_stage == "distil" and ckpt.peak < plain.peak

    memory, _, changes, hint = fit(plain.peak, curvature=True, checkpointing="auto")
    assert (changes, hint, memory.checkpointing, memory.curvature) == ([], None, False, True)
    memory, _, changes, hint = fit(ckpt.peak, curvature=True, checkpointing="auto")
    assert (changes, hint, memory.checkpointing, memory.curvature) == (["gradient checkpointing on"], None, True, True)
    memory, _, changes, hint = fit(ckpt.peak, curvature=True, checkpointing="off")
    assert hint is not None and "--gradient-checkpointing on" in hint


def test_macs_per_token_by_hand():
    from recursify.conversion.allocate import macs_per_token

    source = make("llama")  # hidden 64, intermediate 96, 4 heads of 16, 2 KV heads, 6 layers, vocab 97
    d, f, kv = 64, 96, 2 * 16
    dense = d * d + d * kv + d * kv + d * d + d * f + d * f + f * d  # q k v o gate up down
    assert macs_per_token(source) == 6 * dense + d * 97
    r = 4
    lora = r * ((d + d) + (d + kv) + (d + kv) + (d + d) + (d + f) + (d + f) + (f + d))
    assert macs_per_token(source, rf.RecursionConfig(num_loops=2, lora_rank=r)) == 6 * (dense + lora) + d * 97


def test_max_compute_keeps_only_layouts_within_it():
    from recursify.conversion.layout_search import candidates

    source = make("llama")
    every = candidates(source, 0.8)
    assert every and all(c.compute > 1 for c in every)
    limit = min(c.compute for c in every)
    kept = candidates(source, 0.8, max_compute=limit)
    assert kept and all(c.compute <= limit for c in kept) and len(kept) <= len(every)
    with pytest.raises(ValueError, match="--max-compute"):
        candidates(source, 0.8, max_compute=1.0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = rf.convert(make("gemma3"), rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False).train()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))

    def run(on: bool):
        model.zero_grad(set_to_none=True)
        model.checkpoint_positions = on
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run(False)
    loss_ck, grads_ck = run(True)
    torch.testing.assert_close(loss_ck, loss)
    assert grads.keys() == grads_ck.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], msg=n)


def test_conversion_cost_is_smollm2s_for_smollm2_and_grows_with_width():
    """The time planner's conversion cost was measured on SmolLM2: its shape must scale it by
    exactly 1; a model of TinyLlama's shape decomposes 2048-wide matrices (about 4x the work per
    forward, computed by hand in `compress.plan.conversion_scale`'s docstring)."""
    from transformers import LlamaConfig

    from recursify.compress.plan import conversion_scale
    from recursify.families import arch_from_config, detect_family

    def scale(**kw):
        config = LlamaConfig(**kw)
        family = detect_family(config)
        return conversion_scale(arch_from_config(family, config), family)

    smollm2 = scale(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3)
    assert smollm2 == pytest.approx(1.0)
    tinyllama = scale(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4)
    # by hand: 22 * (5 * 2048^3 + 2 * 256^3) / (22 * (2 * 2048^2 + 2 * 2048 * 256 + 3 * 2048 * 5632) + 2048 * 49152)
    by_hand = 22 * (5 * 2048**3 + 2 * 256**3) / (22 * (2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 5632) + 2048 * 49152)
    smol = 30 * (5 * 576**3 + 2 * 192**3) / (30 * (2 * 576**2 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152)
    assert tinyllama == pytest.approx(by_hand / smol) and 3.5 < tinyllama < 4.5


def test_frozen_embeddings_come_after_the_curvature_and_save_twelve_bytes_a_parameter(monkeypatch):
    """A large untied vocabulary: distillation's peak is the embeddings' gradients and AdamW moments."""
    from transformers import LlamaConfig

    from recursify.budget import HEADROOM, fit_memory

    from recursify.util.device import resolve_placement

    vocab, hidden = 50_000, 1024
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    recursion = rf.RecursionConfig(num_loops=2, lora_rank=8)
    args = dict(batch=2, seq_len=128, calib_tokens=1024, placement=resolve_placement("cpu", "float32"),
                target_params=None)

    def fit(free, curvature=True, checkpointing="auto", **kw):
        _free(monkeypatch, int(free / HEADROOM) + 1)
        return fit_memory(config, recursion, **args, curvature=curvature, checkpointing=checkpointing, **kw)

    trained = fit(2**50)[0]
    frozen = fit(2**50, trainable="body")[0]
    assert not trained.frozen_embeddings and frozen.frozen_embeddings
    # by hand: an input embedding and an untied head, each vocab x hidden, lose 4 + 8 bytes a parameter
    assert trained.stages["distil"] - frozen.stages["distil"] == 12 * 2 * vocab * hidden
    least = fit(2**50, curvature=False, checkpointing="on", trainable="body")[0]
    memory, _, changes, hint = fit(least.peak)
    assert hint is None and memory.frozen_embeddings and memory.peak == least.peak
    assert changes == ["gradient checkpointing on", "no output curvature", "embeddings frozen during distillation"]
    memory, _, changes, hint = fit(least.peak, trainable="body")  # asked for: nothing to give up for it
    assert "embeddings frozen during distillation" not in changes
    memory, _, changes, hint = fit(trained.peak)
    assert (changes, hint, memory.frozen_embeddings) == ([], None, False)
