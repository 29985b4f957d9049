"""vLLM serving recursify checkpoints (the out-of-tree model of `recursify.integrations.vllm`).

Runs only where vLLM is installed: `bash scripts/test_vllm.sh` makes such a venv (vllm-cpu on x86
CPUs) and runs this file. Every family's tiny config (head_dim 32: the CPU attention kernels'
smallest) and a real 2-loop SmolLM2 conversion must give recursify's own greedy tokens; `vllm
serve` must answer the OpenAI client; vLLM must hold the checkpoint's weights, not the unrolled
model's.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: faster
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import recursify as rf  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
              max_position_embeddings=256)


def _configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config)

    return {
        "llama": LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False),
        "mistral": MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8),
        "qwen2": Qwen2Config(**COMMON, num_key_value_heads=2),
        "qwen3": Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32),
        "gemma": GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=32),
        "gemma2": Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=32, sliding_window=8,
                               query_pre_attn_scalar=24, attn_logit_softcapping=20.0, final_logit_softcapping=15.0),
        "gemma3": Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=32, sliding_window=8,
                                   query_pre_attn_scalar=32, sliding_window_pattern=3),
        "gpt_neox": GPTNeoXConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                  num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25),
    }


def _source(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[name]).eval()
    with torch.no_grad():  # sharper logits than a random init's: greedy ties are the exception
        model.get_output_embeddings().weight.mul_(8)
    return model


def reference(model, prompts, n):
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]


def vllm_tokens(folder, prompts, n, **kw):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256,
              **kw)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    weights = sum(p.numel() * p.element_size() for p in _vllm_model(llm).parameters())
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outs], weights


def _vllm_model(llm):
    engine = llm.llm_engine
    executor = engine.model_executor if hasattr(engine, "model_executor") else engine.engine_core.engine_core.model_executor
    return executor.driver_worker.worker.model_runner.model


PROMPTS = [[5, 9, 17, 3, 44, 2, 8, 61, 33, 7], [100, 3, 7, 77, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


@pytest.mark.parametrize("family", sorted(_configs()))
def test_vllm_greedy_equals_recursify_generate(family, tmp_path):
    model = rf.convert(_source(family), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    model.save_pretrained(tmp_path / "ck")
    got, weights = vllm_tokens(tmp_path / "ck", PROMPTS, 8)
    assert got == reference(model, PROMPTS, 8)
    # The checkpoint's tensors, each once: the shared layers are not unrolled in vLLM's memory.
    checkpoint = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert weights <= checkpoint * 1.01 + 64 * 128 * 4 * 2  # vLLM pads the vocabulary to a multiple of 64


def test_vllm_serves_a_real_smollm2_conversion(tmp_path):
    teacher, tok = rf.load_pretrained("smollm2-135m")
    model = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=64), progress=False)
    model.save_pretrained(tmp_path / "ck")
    tok.save_pretrained(tmp_path / "ck")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (24,), generator=g).tolist() for _ in range(4)]
    got, weights = vllm_tokens(tmp_path / "ck", prompts, 16)
    ref = reference(model, prompts, 16)
    assert sum(a == b for a, b in zip(got, ref)) >= 3, (got, ref)
    unrolled = sum(p.numel() for p in teacher.parameters()) * 4
    assert weights < 0.9 * unrolled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_the_openai_client(tmp_path):
    from openai import OpenAI

    teacher, tok = rf.load_pretrained("smollm2-135m")
    model = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=16), progress=False)
    model.save_pretrained(tmp_path / "ck")
    tok.save_pretrained(tmp_path / "ck")
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    # `vllm serve` is `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` script looks up
    # the metadata of a distribution named vllm, which vllm-cpu is not, and fails).
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "ck"),
                               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.time() + 240
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("vllm serve did not start:\n" + (server.stdout.read() if server.stdout else ""))
                time.sleep(2)
        done = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens == 8
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hello."}],
                                                max_tokens=8, temperature=0, stream=True)
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(chunks) > 1 and "".join(chunks)
    finally:
        server.terminate()
        server.wait(30)
