"""The OpenAI-compatible server, driven by the real `openai` client over loopback.

uvicorn runs in a background thread of the test process on 127.0.0.1 with an ephemeral port,
serving a tiny random model with an offline word-level tokenizer (test_engine.make_tokenizer).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import recursify as rf
from recursify.engine import LLMEngine, SamplingParams
from recursify.server import create_app, serve
from test_engine import load_smollm2, make_tokenizer
from tiny_models import make

MODEL = "tiny-rec"
CONTEXT = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ServerThread:
    """uvicorn on 127.0.0.1:<ephemeral> in a daemon thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def tiny():
    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    return model, make_tokenizer()


class StepGate:
    """Once armed, parks the stepping thread one step after the first token until released.

    A request is then surely still in flight, however slow or fast the machine, and an abort (which
    only needs the engine lock, not a step) is the only way it can finish meanwhile.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._armed = self._seen_token = False
        self._generation = 0

    def arm(self):
        with self._cond:
            self._generation += 1
            self._armed, self._seen_token = True, False
            self._cond.notify_all()

    def release(self):
        with self._cond:
            self._armed = False
            self._cond.notify_all()

    def __call__(self, stats):
        with self._cond:
            if self._armed and self._seen_token:
                held = self._generation
                self._cond.wait_for(lambda: not self._armed or self._generation != held, timeout=30)
            elif self._armed and stats.emitted:  # a step parked by an earlier hold never counts
                self._seen_token = True


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    engine = LLMEngine(model, tok, max_batch=4, max_model_len=CONTEXT, max_queue=4)
    gate = StepGate()  # tests that need requests to stay in flight hold the stepping thread
    engine.listeners.append(gate)
    app = create_app(engine, MODEL, tok)
    srv = ServerThread(app)
    srv.engine, srv.gate, srv.app_engine = engine, gate, app.state.engine
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def idle(engine, timeout=10.0) -> bool:
    """Wait until no request holds a slot or waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_unfinished() and engine.cache.num_free == engine.cache.num_slots:
            return True
        time.sleep(0.02)
    return False


PROMPT = "w5 w6 w7 w8 w9 w10"


def greedy_text(server, prompt, n):
    model, tok = server.engine.model, server.engine.tokenizer
    ids = tok(prompt)["input_ids"]
    ref = LLMEngine(model, tok, max_batch=1, max_model_len=CONTEXT).generate([ids], SamplingParams(max_tokens=n))[0]
    return ref


# ---------------------------------------------------------------- happy paths
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("recursify_queue_depth", "recursify_batch_occupancy", "recursify_tokens_per_second",
                 "recursify_exit_depth_loops_bucket", "recursify_generation_tokens_total"):
        assert name in text
    assert 'recursify_exit_depth_loops_bucket{le="2.0"}' in text


def test_completion_matches_the_engine_and_streams_the_same_text(server, client):
    ref = greedy_text(server, PROMPT, 10)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    # Token-id prompts are accepted too.
    ids = server.engine.tokenizer(PROMPT)["input_ids"]
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0).choices[0].text == ref.text


def test_chat_completion_plain_and_streamed(server, client):
    messages = [{"role": "user", "content": "w9 w8 w7"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    msg = out.choices[0].message
    assert msg.role == "assistant" and out.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_seeded_sampling_through_the_api(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# ---------------------------------------------------------------- bad input
BAD = [
    ("malformed json", b'{"prompt": "w5", ', None),
    ("not an object", b"[1, 2]", None),
    ("max_tokens string", {"prompt": PROMPT, "max_tokens": "5"}, "max_tokens"),
    ("max_tokens bool", {"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
    ("max_tokens zero", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"prompt": PROMPT, "max_tokens": -3}, "max_tokens"),
    ("max_tokens beyond context", {"prompt": PROMPT, "max_tokens": CONTEXT}, "max_tokens"),
    ("empty prompt", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("empty token prompt", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("prompt wrong type", {"prompt": 5, "max_tokens": 2}, "prompt"),
    ("prompt too long", {"prompt": " ".join(["w5"] * CONTEXT), "max_tokens": 1}, "prompt"),
    ("token id out of vocab", {"prompt": [5, 10_000], "max_tokens": 2}, "prompt"),
    ("temperature too high", {"prompt": PROMPT, "temperature": 3}, "temperature"),
    ("temperature negative", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("temperature string", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("top_p zero", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("top_p above one", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("stream not bool", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("stop wrong type", {"prompt": PROMPT, "stop": 3}, "stop"),
    ("n above one", {"prompt": PROMPT, "n": 2}, "n"),
    ("unknown model", {"model": "gpt-5", "prompt": PROMPT}, "model"),
]


@pytest.mark.parametrize("case,body,param", BAD, ids=[c[0] for c in BAD])
def test_bad_completion_requests_are_400_with_an_openai_error(server, case, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "w5"}], "max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": [{"role": "user", "content": " ".join(["w5"] * CONTEXT)}]}, "messages"),
])
def test_bad_chat_requests_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_openai_client_sees_bad_requests_as_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, top_p=2.0)


def test_unknown_route_is_an_openai_404(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


# ---------------------------------------------------------------- back-pressure and cancellation
def test_full_queue_is_429_with_retry_after_and_slots_come_back(server, client):
    engine = server.engine
    capacity = engine.cache.num_slots + engine.scheduler.max_waiting  # 4 running + 4 queued
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stream": True}
    server.gate.arm()  # nothing can finish and free a place before the extra request arrives
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(capacity)]
            responses = [s.__enter__() for s in streams]
            assert all(r.status_code == 200 for r in responses)
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            for s in streams:
                s.__exit__(None, None, None)  # hang up: each request is cancelled
        assert idle(engine), "disconnected requests must give their slots back, held or not"
    finally:
        server.gate.release()
    assert idle(engine)
    assert server.app_engine.errors == 0


def test_client_disconnect_cancels_streamed_and_plain_requests(server):
    engine, gate = server.engine, server.gate
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "ignore_eos": True}

    def aborted_while_held(req) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and req.finish_reason is None:
            time.sleep(0.02)
        return req.finish_reason == "abort"

    gate.arm()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                # Wait for the first token rather than the first line: a sampled special token
                # has no text, so no line would come while the gate holds the engine.
                deadline = time.monotonic() + 20
                while not any(q.output_token_ids for q in list(engine.requests.values())):
                    assert time.monotonic() < deadline, "no token was generated"
                    time.sleep(0.02)
                (req,) = engine.requests.values()
        assert aborted_while_held(req), req.finish_reason
    finally:
        gate.release()
    assert idle(engine)

    gate.arm()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        assert idle(engine), "held after its first token, the request can only have ended by an abort"
    finally:
        gate.release()
    assert idle(engine)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_64_concurrent_streaming_clients(server):
    """Every client either completes or is cleanly refused; no 5xx; memory does not creep."""

    async def one(client, i):
        try:
            stream = await client.completions.create(model=MODEL, prompt=f"w{5 + i % 50} w7 w8", max_tokens=12,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            assert chunks[-1].choices[0].finish_reason == "length"
            return "ok"
        except openai.RateLimitError:
            return "429"
        except openai.APIStatusError as e:
            return f"{e.status_code}"

    async def round_():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(round_())
    gc.collect()
    rss_first = rss_bytes()
    results += asyncio.run(round_())
    gc.collect()
    rss_second = rss_bytes()
    assert set(results) <= {"ok", "429", "503"}, results
    assert results.count("ok") >= 8
    assert idle(server.engine)
    assert server.app_engine.errors == 0
    assert rss_second - rss_first < 40 * 2**20, (rss_first, rss_second)


# ---------------------------------------------------------------- start-up and shutdown
def test_serve_refuses_what_is_not_a_causal_lm_folder(tmp_path):
    from transformers import ViTConfig

    (tmp_path / "empty").mkdir()
    ViTConfig().save_pretrained(tmp_path / "vit")
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "empty", tmp_path / "vit", tmp_path / "file.txt"):
        with pytest.raises(ValueError) as e:
            serve(str(path), port=0)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_serve_exit_mode_classifier_needs_a_matching_probe_file(tmp_path):
    from recursify.engine import ExitClassifier

    folder = tmp_path / "rec"
    rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    for needles in (("exit_classifier.safetensors", "recursify exits fit"), ("hidden size 32", "refit")):
        with pytest.raises(ValueError) as e:
            serve(str(folder), port=0, exit_mode="classifier")
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)
        ExitClassifier(32, 1, {"threshold": 0.5}).save(folder)  # the second round: the wrong width


def test_a_hugging_face_folder_is_served_as_its_one_loop_conversion(tmp_path):
    from recursify.hub import load_for_serving

    source = make("qwen2")
    source.save_pretrained(tmp_path / "hf")
    make_tokenizer().save_pretrained(tmp_path / "hf")
    model, tok = load_for_serving(str(tmp_path / "hf"))
    assert isinstance(model, rf.RecursiveForCausalLM) and model.layout.num_loops == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-4, rtol=0)


DRAIN_SCRIPT = r"""
import sys, time, torch, uvicorn
from recursify.engine import LLMEngine
from recursify.hub import load_for_serving
from recursify.server import create_app
torch.set_num_threads(1)
model, tok = load_for_serving(sys.argv[1])
engine = LLMEngine(model, tok, max_batch=2, max_model_len=64)
engine.listeners.append(lambda s: time.sleep(0.01))  # keep the request in flight at SIGTERM
uvicorn.run(create_app(engine, "tiny", tok), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            timeout_graceful_shutdown=30)
"""


def test_sigterm_drains_in_flight_requests_then_exits(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", DRAIN_SCRIPT, str(tmp_path / "ckpt"), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        events = [json.loads(x[6:]) for x in [first] + rest if x != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal after its graceful shutdown: the conventional SIGTERM status.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert b"Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_smollm2_chat_through_the_openai_client():
    try:
        teacher, tok = load_smollm2()
    except rf.ModelLoadError as e:
        pytest.skip(str(e))
    model = rf.convert(teacher, rf.RecursionConfig(num_loops=1), progress=False)
    engine = LLMEngine(model, tok, max_batch=2, max_model_len=256)
    srv = ServerThread(create_app(engine, "smollm2", tok))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
        assert "Paris" in out.choices[0].message.content
        chunks = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        ref = teacher.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.choices[0].message.content == tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    finally:
        srv.stop()
