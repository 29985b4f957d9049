"""The serving engine against the model's own `generate`, on tiny random models.

The central invariant: with early exit off, continuous depth-wise batching changes when work
runs, never what is computed, so greedy output equals `model.generate(do_sample=False)`.
"""

from __future__ import annotations

import functools

import pytest
import torch

import recursify as rf
from recursify.engine import (
    CacheBudgetError,
    ExitConfig,
    KVCache,
    LLMEngine,
    ParamError,
    QueueFullError,
    SamplingParams,
)
from tiny_models import make

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def convert(family="llama", **kw):
    kw.setdefault("num_loops", 2)
    kw.setdefault("lora_rank", 4)
    model = rf.convert(make(family), rf.RecursionConfig(**kw), progress=False)
    model.generation_config.eos_token_id = None  # fixed-length references
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt, n=8):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class LoopLog:
    """Wraps the runner to record the loop of every row in every step."""

    def __init__(self, engine):
        self.steps = []
        inner = engine.runner.execute_model

        def step(batch):
            self.steps.append([(r.request_id, r.loop, r.length) for r in batch.rows])
            return inner(batch)

        engine.runner.execute_model = step

    def mixed_loop_steps(self):
        return [s for s in self.steps if len({loop for _, loop, _ in s}) > 1]


# ---------------------------------------------------------------- exactness without exit
@pytest.mark.parametrize(
    "family,strategy",
    [("llama", "cycle"), ("gemma3", "middle_cycle"), ("gpt_neox", "cycle"), ("qwen3", "cycle"), ("mistral", "sequence")],
)
def test_greedy_equals_model_generate_for_concurrent_requests(family, strategy):
    model = convert(family, strategy=strategy)
    ps = prompts([7, 3, 12, 5, 9])
    # 3 slots for 5 requests (queueing), small chunks (chunked prefill mixed with decode).
    engine = LLMEngine(model, max_batch=3, max_model_len=64, prefill_chunk=5)
    outs = engine.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.finished and o.finish_reason == "length"
        assert o.token_ids == reference(model, p)


def test_single_request_and_stream_match_generate():
    model = convert(num_loops=3, lora_rank=8)
    p = prompts([6])[0]
    engine = LLMEngine(model, max_batch=2, max_model_len=64)
    assert engine.generate([p], GREEDY)[0].token_ids == reference(model, p)
    streamed = [t for out in engine.stream(p, GREEDY) for t in out.delta_token_ids]
    assert streamed == reference(model, p)
    assert engine.cache.num_free == engine.cache.num_slots


def test_one_loop_model_is_ordinary_continuous_batching():
    """A num_loops=1 conversion is the source model; the engine then runs full depth per step."""
    source = make("llama")
    model = rf.convert(source, rf.RecursionConfig(num_loops=1), progress=False)
    engine = LLMEngine(model, max_batch=4, max_model_len=64)
    assert engine.num_loops == 1
    log = LoopLog(engine)
    ps = prompts([4, 10, 6])
    outs = engine.generate(ps, SamplingParams(max_tokens=6, ignore_eos=True))
    for p, o in zip(ps, outs):
        ref = source.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o.token_ids == ref[0, len(p):].tolist()
        assert set(o.exit_depths) == {1}
    assert all(loop == 0 for s in log.steps for _, loop, _ in s)


def test_rows_at_different_loops_get_what_they_get_alone():
    model = convert("gemma3", num_loops=3, lora_rank=4)  # sliding + full layers, 3 loops
    ps = prompts([5, 8, 3], seed=3)
    # Replayed exits: tokens leave after 1, 2 or 3 loops, so rows drift apart in depth.
    schedule = [3, 1, 2, 1, 3, 2, 1, 2]
    alone = []
    for p in ps:
        e = LLMEngine(model, max_batch=1, max_model_len=64, exit="replay")
        e.add_request(p, GREEDY, exit_schedule=schedule)
        alone.append(run(e)[0])
    engine = LLMEngine(model, max_batch=3, max_model_len=64, exit="replay")
    log = LoopLog(engine)
    for i, p in enumerate(ps):
        engine.add_request(p, GREEDY, exit_schedule=schedule)
        engine.step()  # staggered arrivals: each request enters while the others are mid-loop
        engine.step()
    batched = run(engine)
    assert len(log.mixed_loop_steps()) >= 3
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        assert a.exit_depths == b.exit_depths == schedule


def run(engine):
    """Step until idle; final outputs in arrival order."""
    done = {}
    order = list(engine.requests)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r] for r in order if r in done]


# ---------------------------------------------------------------- early exit
def test_oracle_exit_output_equals_full_depth_greedy():
    model = convert(num_loops=3, lora_rank=4)
    ps = prompts([5, 9, 4])
    full = LLMEngine(model, max_batch=3, max_model_len=64).generate(ps, GREEDY)
    oracle = LLMEngine(model, max_batch=3, max_model_len=64, exit="oracle").generate(ps, GREEDY)
    for f, o in zip(full, oracle):
        assert o.token_ids == f.token_ids
        assert all(1 <= d <= 3 for d in o.exit_depths)
    depths = [d for o in oracle for d in o.exit_depths]
    assert min(depths) < 3, "some token should be predictable before the last loop"
    # The recorded depths are exact: the exit logits at that loop already give the token.
    p, o = ps[0], oracle[0]
    ids = torch.tensor([p + o.token_ids])
    states = model(ids, output_loop_states=True).loop_hidden_states
    for i, (tok, d) in enumerate(zip(o.token_ids[1:], o.exit_depths[1:])):
        pos = len(p) + i  # the fed-back token that predicted `tok`
        preds = [int(model.exit_logits(states[b][0, pos]).argmax()) for b in range(3)]
        assert preds[d - 1] == tok and all(x != tok for x in preds[: d - 1])


def test_exit_at_first_loop_uses_the_first_loop_prediction():
    model = convert(num_loops=2)
    p = prompts([6])[0]
    out = LLMEngine(model, max_batch=1, max_model_len=64, exit=ExitConfig("confidence", 1e-6)).generate([p], GREEDY)[0]
    # Max softmax >= 1/V > 1e-6 always: the first token comes from the prompt's full-depth pass,
    # every later one exits after loop 1.
    assert out.exit_depths == [2] + [1] * 7
    ids = torch.tensor([p + out.token_ids[:1]])
    assert out.token_ids[1] == int(model(ids, depth=torch.tensor([1])).logits[0, -1].argmax())


def test_threshold_one_never_exits_and_entropy_mode_runs():
    model = convert(num_loops=2)
    ps = prompts([5, 7])
    full = LLMEngine(model, max_batch=2, max_model_len=64).generate(ps, GREEDY)
    never = LLMEngine(model, max_batch=2, max_model_len=64, exit_threshold=1.0).generate(ps, GREEDY)
    assert [o.token_ids for o in never] == [o.token_ids for o in full]
    ent = LLMEngine(model, max_batch=2, max_model_len=64, exit=ExitConfig("entropy", 1e-9)).generate(ps, GREEDY)
    assert all(o.exit_depths[1:] == [1] * 7 for o in ent)


@pytest.mark.parametrize("family,strategy", [("llama", "cycle"), ("gemma3", "middle_cycle"), ("gpt_neox", "cycle"), ("qwen3", "cycle")])
def test_kv_projection_matches_the_keys_layer_forward_attends_with(family, strategy):
    """State propagation computes skipped k/v without the layer; they must be the layer's own."""
    model = convert(family, strategy=strategy, num_loops=2)
    h = torch.randn(2, 5, model.arch.hidden_size)
    rope = model.rope(h, torch.arange(5).expand(2, -1))
    seen = {}

    def attend(q, k, v, position, is_sliding):
        seen["kv"] = (k, v)
        return q

    positions = torch.tensor(model.layout.positions_of_slot(model.layout.edge)[:2])
    slot = model.layout.slot_of_position[int(positions[0])]
    model.layer_forward(slot, positions, h, rope, attend)
    k, v = model.kv_projection(slot, positions, h, rope)
    torch.testing.assert_close(k, seen["kv"][0])
    torch.testing.assert_close(v, seen["kv"][1])


# ---------------------------------------------------------------- device placement
def test_every_tensor_a_step_builds_follows_the_model_device():
    """With no GPU here, the default device is switched to `meta` around each step instead: the
    model and cache stay on the CPU, so a tensor built without the model's device lands on meta
    and the step breaks, as a host-built tensor breaks a step on a GPU-served model."""
    model = convert(strategy="middle_cycle")  # prelude and coda layers run on subsets of rows
    ps = prompts([5, 9, 3], seed=2)
    schedule = [1, 2, 2, 1, 1, 2, 1, 2, 2]  # replayed exits: rows at mixed loops, skipped k/v filled
    params = [GREEDY, GREEDY, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)]

    def outputs(engine):
        for i, (p, sp) in enumerate(zip(ps, params)):
            engine.add_request(p, sp, exit_schedule=schedule[i:])
        return [(o.token_ids, o.exit_depths) for o in run(engine)]

    expected = outputs(LLMEngine(model, max_batch=3, max_model_len=64, exit="replay"))
    engine = LLMEngine(model, max_batch=3, max_model_len=64, exit="replay")
    device = model.embed_tokens.weight.device
    assert engine.cache.k.device == engine.cache.v.device == device
    log = LoopLog(engine)
    seen = {"write": set(), "hidden": set(), "logits": set()}
    cache_write, runner_step, engine_step = engine.cache.write, engine.runner.execute_model, engine.step

    def write(*args):
        seen["write"].update(a.device for a in args)
        cache_write(*args)

    def step_runner(batch):
        output = runner_step(batch)
        seen["hidden"].update(o.hidden.device for o in output.rows if o.hidden is not None)
        seen["logits"].update(o.logits.device for o in output.rows if o.logits is not None)
        return output

    def step():
        with torch.device("meta"):
            return engine_step()

    engine.cache.write, engine.runner.execute_model, engine.step = write, step_runner, step
    assert outputs(engine) == expected
    assert log.mixed_loop_steps()
    assert seen["write"] == seen["hidden"] == {device}
    assert seen["logits"] == {torch.device("cpu")}  # handed to sampling on the host


# ---------------------------------------------------------------- cache, queue, sampling
def test_kv_cache_budget_queues_and_frees_on_completion():
    model = convert()
    a = model.arch
    per_slot = KVCache.bytes_per_slot(a.num_layers, a.num_kv_heads, a.head_dim, 32)
    engine = LLMEngine(model, max_batch=8, max_model_len=32, kv_cache_bytes=2 * per_slot + 100, max_queue=2)
    assert engine.cache.num_slots == 2  # the budget, not max_batch, decides
    assert engine.cache.nbytes == 2 * per_slot
    ps = prompts([4, 5, 6, 7])
    for p in ps:
        engine.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(QueueFullError):
        engine.add_request(ps[0], GREEDY)
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    assert engine.cache.num_free == 0
    outs = run(engine)
    assert len(outs) == 4 and all(o.finish_reason == "length" for o in outs)
    assert engine.cache.num_free == 2
    with pytest.raises(CacheBudgetError, match="cannot hold one sequence"):
        LLMEngine(model, max_model_len=32, kv_cache_bytes=per_slot // 2)


def test_abort_frees_the_slot_immediately():
    model = convert()
    engine = LLMEngine(model, max_batch=1, max_model_len=64)
    r1 = engine.add_request(prompts([5])[0], SamplingParams(max_tokens=30, ignore_eos=True))
    r2 = engine.add_request(prompts([4])[0], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.abort(r1.request_id) and r1.finish_reason == "abort"
    assert engine.cache.num_free == 1
    outs = run(engine)
    assert [o.request_id for o in outs] == [r2.request_id]
    assert not engine.abort(r1.request_id)


def test_request_validation_is_clear():
    model = convert()
    engine = LLMEngine(model, max_batch=1, max_model_len=16)
    with pytest.raises(ParamError, match="exceeds the context") as e:
        engine.add_request([5] * 10, SamplingParams(max_tokens=7))
    assert e.value.param == "max_tokens"
    with pytest.raises(ParamError, match="prompt is 16 tokens"):
        engine.add_request([5] * 16, SamplingParams(max_tokens=1))
    with pytest.raises(ParamError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ParamError, match="token ids"):
        engine.add_request([5, 1000], GREEDY)
    with pytest.raises(ParamError, match="tokenizer"):
        engine.add_request("hello", GREEDY)
    for bad, param in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed=1.5), "seed"),
        (dict(stop=[""]), "stop"),
    ]:
        with pytest.raises(ParamError) as e:
            SamplingParams(**bad)
        assert e.value.param == param
    with pytest.raises(TypeError, match="num_loops=1"):
        LLMEngine(make("llama"))
    with pytest.raises(ValueError, match="unknown exit mode"):
        ExitConfig("sometimes")


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = convert()
    ps = prompts([5, 6, 7])
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    alone = LLMEngine(model, max_batch=1, max_model_len=64).generate(ps[:1], sp)[0]
    batched = LLMEngine(model, max_batch=3, max_model_len=64).generate(ps, [sp, sp, sp])
    assert batched[0].token_ids == alone.token_ids
    other = LLMEngine(model, max_batch=1, max_model_len=64).generate(
        ps[:1], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    )[0]
    assert other.token_ids != alone.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy():
    from recursify.engine.sampling import filter_logits

    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert torch.isfinite(filter_logits(logits, 1.0, 1, 1.0)).tolist() == [False, True, False, False]
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 1e-6)).tolist() == [False, True, False, False]
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8)).tolist()
    assert kept == [False, True, True, False]  # p(3.0)=0.63 < 0.8, adding p(2.0) reaches it


def make_tokenizer():
    """Offline word-level tokenizer over the tiny models' 97 ids: "w5" is id 5, <eos> is 1.

    Carries a minimal chat template so that the server's chat endpoint can be tested too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 97)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
    )
    return tok


def test_eos_and_stop_strings_end_a_request():
    tok = make_tokenizer()
    model = convert()
    engine = LLMEngine(model, tok, max_batch=2, max_model_len=64)
    p = "w5 w6 w7 w8 w9"
    free = engine.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    words = free.text.split()
    assert len(free.token_ids) == 12
    # A stop string made of a word the model generates cuts the text before it.
    target = words[3]
    cut = engine.generate([p], SamplingParams(max_tokens=12, ignore_eos=True, stop=[target]))[0]
    assert cut.finish_reason == "stop" and target not in cut.text
    assert free.text.startswith(cut.text)
    # EOS ends the request unless ignore_eos.
    engine.eos_ids = {free.token_ids[2]}
    eos = engine.generate([p], SamplingParams(max_tokens=12))[0]
    assert eos.finish_reason == "stop" and eos.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]


def test_stream_deltas_hold_back_a_possible_stop_prefix():
    from recursify.engine.request import Request

    req = Request([1], SamplingParams(stop=["STOP"]))
    req.text = "hello ST"
    assert req.stream_delta(final=False)[0] == "hello "
    req.text = "hello STa"
    assert req.stream_delta(final=False)[0] == "STa"
    req.text = "hello STa\ufffd"
    assert req.stream_delta(final=False)[0] == ""
    assert req.stream_delta(final=True)[0] == "\ufffd"


def test_async_engine_streams_and_aborts():
    import asyncio

    from recursify.engine import AsyncLLMEngine

    model = convert()
    engine = AsyncLLMEngine(LLMEngine(model, max_batch=2, max_model_len=64)).start()
    ps = prompts([5, 6])

    async def main():
        async def one(p):
            return [t async for out in engine.generate(p, GREEDY) for t in out.delta_token_ids]

        got = await asyncio.gather(*(one(p) for p in ps))
        # Closing a stream early aborts the request and frees its slot.
        gen = engine.generate(ps[0], SamplingParams(max_tokens=40, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()
        return got

    try:
        got = asyncio.run(main())
        assert got == [reference(model, p) for p in ps]
        assert not engine.engine.has_unfinished() and engine.engine.cache.num_free == 2
    finally:
        engine.shutdown()
    assert not engine.running


# ---------------------------------------------------------------- the real model
@functools.lru_cache(maxsize=1)
def load_smollm2():
    """Loaded once per test process (test_server reuses it)."""
    return rf.load_pretrained("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2()
    except rf.ModelLoadError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_engine_matches_generate_and_the_teacher(smollm2):
    teacher, tok = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little girl who"]
    ids = [tok(t)["input_ids"] for t in texts]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    vanilla = rf.convert(teacher, rf.RecursionConfig(num_loops=1), progress=False)
    out = LLMEngine(vanilla, tok, max_batch=3, max_model_len=128).generate(ids, sp)
    for p, o in zip(ids, out):
        ref = teacher.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)
        assert o.token_ids == ref[0, len(p):].tolist()
    assert "Paris" in out[0].text
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=64), progress=False)
    student.generation_config.eos_token_id = None
    engine = LLMEngine(student, tok, max_batch=2, max_model_len=128, prefill_chunk=4)
    for p, o in zip(ids, engine.generate(ids, sp)):
        assert o.token_ids == reference(student, p, 12)
    oracle = LLMEngine(student, tok, max_batch=3, max_model_len=128, exit="oracle").generate(ids, sp)
    assert [o.token_ids for o in oracle] == [reference(student, p, 12) for p in ids]
