"""Device and dtype: resolution and its errors, every path in bfloat16 on the CPU, and the number of
device-to-host reads in a decode step."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import recursify as rf
from recursify.engine import ExitConfig, LLMEngine, SamplingParams
from recursify.util.device import DeviceError, resolve_dtype, resolve_placement
from tiny_models import FAMILIES, make

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
NO_CUDA = not torch.cuda.is_available()
# The bf16 and read-count tests run where RECURSIFY_TEST_DEVICE says (scripts/gpu_check.sh: cuda).
DEVICE = torch.device(os.environ.get("RECURSIFY_TEST_DEVICE", "cpu"))
IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)


# ---------------------------------------------------------------- resolution
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    if not NO_CUDA:
        pytest.skip("a GPU is present: auto picks it")
    p = resolve_placement("auto", "auto")
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("device,dtype,message", [
    ("cuda", "auto", "CUDA is not available"),
    ("cuda:3", "auto", "CUDA is not available"),
    ("tpu9", "auto", "unknown device"),
    ("meta", "auto", "holds no data"),
    ("cpu", "float8", "unknown dtype"),
])
def test_bad_device_or_dtype_is_one_clear_error(device, dtype, message):
    if device.startswith("cuda") and not NO_CUDA:
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError, match=message):
        resolve_placement(device, dtype)


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("argv", [
    ["serve", "smollm2-135m", "--device", "cuda"],
    ["eval", "smollm2-135m", "--tasks", "ppl", "--device", "cuda"],
    ["convert", "smollm2-135m", "--out", "never-written", "--device", "cuda"],
    ["compress", "smollm2-135m", "--data", "missing", "--out", "never-written", "--device", "cuda"],
    ["generate", "smollm2-135m", "--dtype", "int8"],
    ["exits", "fit", ".", "--data", "x", "--device", "cuda"],
    ["bench-serve", "--device", "cuda"],
    ["train", "--student", "s", "--teacher", "t", "--data", "d", "--out", "never-written", "--device", "cuda"],
])
def test_every_command_refuses_a_missing_device_before_loading(argv, capfd, tmp_path, monkeypatch):
    """A non-zero exit, the reason on stderr without a traceback, nothing written, and no weights
    read (loading fails the test)."""
    from recursify import hub
    from recursify.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "load_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    try:
        code = main(argv)
    except SystemExit as e:  # bench-serve's argparse
        code = e.code
    err = capfd.readouterr().err.strip()
    assert code not in (0, None)
    assert "CUDA is not available" in err or "unknown dtype" in err or "not a recursify" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bf16 correctness on the CPU
def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_rank_bf16_conversion_is_as_close_to_the_original_as_the_original_in_bf16(family):
    """Tolerance, justified: bfloat16 keeps 8 significant bits, so even the original model run in
    bf16 differs from its fp32 self by its own rounding error e. The full-rank conversion in bf16
    rounds a few more times per linear (W_shared, the factors B and A, their product), so it may
    differ by a small multiple of e, never by an amount of another order: 4 e, plus 1e-2 absolute for
    logits where e itself is tiny. The conversion's maths stays float32/float64 (converting
    the fp32 original), only its result is cast."""
    source = make(family).to(DEVICE)
    with torch.no_grad():
        ref = source(IDS).logits
        own_bf16 = make(family).to(DEVICE, torch.bfloat16)(IDS).logits
        model = rf.convert(source, rf.RecursionConfig(num_loops=2, lora_rank="full"), progress=False,
                           dtype="bfloat16")
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        got = model(IDS).logits
    e = _max_err(own_bf16, ref)
    assert _max_err(got, ref) <= 4 * e + 1e-2, (family, _max_err(got, ref), e)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=1e-3))) - 7)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_greedy_in_bf16_equals_the_same_models_generate(family):
    """The engine's tokens equal bf16 `generate()`'s up to its first near-tie, and every one of them
    is the argmax of the same model's bf16 forward over the sequence, up to 4 bf16 spacings of the
    top logit. A random tiny model's logits are flat: its top two often differ by less than that
    (or not at all), and summation order, which batching changes, then picks either."""
    model = rf.convert(make(family).to(DEVICE), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False,
                       dtype="bfloat16")
    model.generation_config.eos_token_id = None
    prompts = [IDS[0, :7].tolist(), IDS[1, :11].tolist()]
    engine = LLMEngine(model, max_batch=2, max_model_len=64, exit=ExitConfig("none"))
    assert engine.cache.k.dtype == torch.bfloat16
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + o.token_ids], device=DEVICE), use_cache=False).logits[0, len(p) - 1: -1].float()
        top = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(o.token_ids, device=DEVICE).view(-1, 1)).squeeze(1)
        near = (top - chosen) <= 4 * _bf16_ulp(top)
        assert near.all(), (o.token_ids, (top - chosen).tolist())
        tied = (logits.topk(2).values[:, 0] - logits.topk(2).values[:, 1]) <= 4 * _bf16_ulp(top)
        first_tie = int(tied.nonzero()[0]) if tied.any() else len(ref)
        assert o.token_ids[:first_tie] == ref[:first_tie], (o.token_ids, ref, first_tie)


def test_a_bf16_kd_step_lowers_the_loss():
    """AdamW on float32 master weights, forward and loss under bf16 autocast (what --dtype bfloat16
    trains with): a few steps on one batch lower the KD loss against the teacher."""
    from recursify.train.losses import LossConfig, distillation_loss

    teacher = make("llama").to(DEVICE)
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=2), progress=False).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    with torch.no_grad():
        target = teacher(IDS).logits
    losses = []
    for _ in range(6):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = distillation_loss(student, IDS, target, LossConfig())["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- device-to-host reads per step
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_reads():
    """Counts every method through which a tensor's values reach Python (on a GPU, each is a
    device-to-host synchronisation)."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(fn):
        def counted(self, *a, **k):
            counts["n"] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("exit_mode,limit", [("none", 1), ("confidence", 2)])
def test_a_decode_step_reads_the_device_at_most_a_constant_number_of_times(exit_mode, limit):
    """Rows at different loops of a middle-cycle layout (per-row LoRA, sliding and full attention
    mixed, Gemma 3): with exits off a step's only read is the sampled token ids; deciding exits
    adds one read of the decisions."""
    model = rf.convert(make("gemma3").to(DEVICE), rf.RecursionConfig(num_loops=3, lora_rank=4), progress=False)
    model.generation_config.eos_token_id = None
    engine = LLMEngine(model, max_batch=4, max_model_len=64, exit=ExitConfig(exit_mode, 0.5))
    for i, p in enumerate([IDS[0, :5].tolist(), IDS[1, :9].tolist(), IDS[0, 2:8].tolist()]):
        engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8 if i == 2 else 0, seed=3))
    per_step = []
    while engine.has_unfinished():
        batch = engine.scheduler.schedule()
        with count_reads() as counts:
            output = engine.runner.execute_model(batch)
        per_step.append((counts["n"], sum(r.is_decode for r in batch.rows)))
        engine.scheduler.update_from_output(batch, output)
    decode_steps = [n for n, decodes in per_step if decodes]
    assert decode_steps and max(decode_steps) <= limit, per_step
