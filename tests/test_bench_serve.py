"""The serving benchmark on a tiny saved teacher and student: it serves the saved student (its
rows equal the checkpoint's own `generate`), transformers' continuous batching reproduces the
original model's greedy output, every exit policy is measured, the lossless mode is lossless,
and a bad --student is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import recursify as rf
import recursify.bench.serve as bench
from recursify.bench.rows import hf_batching_unavailable
from recursify.bench.student import StudentError, check_student
from recursify.engine.exit_classifier import fit_exit_classifier
from tiny_models import make


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 97)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny teacher folder and a 2-loop student of it, saved as `recursify train` would."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    teacher = make("llama")
    teacher.generation_config.eos_token_id = None
    tok = _tokenizer()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    with torch.no_grad():  # a "trained" student: unlike a fresh conversion of the teacher
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    clf = fit_exit_classifier(student, torch.randint(2, 97, (4, 16)).split(2), steps=20)
    clf.meta["threshold"] = 0.5  # as `recursify exits fit` would calibrate it
    clf.save(root / "student")
    return root


def test_bench_serves_the_saved_student_and_measures_every_policy(saved, tmp_path, monkeypatch):
    import recursify.bench.workload as workload

    monkeypatch.setattr(workload, "wiki_corpus", lambda: None)  # random ids: the word-level tokenizer knows no wiki words
    calls = []
    run_row = bench.run_row

    def recorded(model, tok, prompts, arrivals, args, batch, **kw):
        result = run_row(model, tok, prompts, arrivals, args, batch, **kw)
        calls.append((model, prompts, kw.get("exit"), result))
        return result

    monkeypatch.setattr(bench, "run_row", recorded)
    out = tmp_path / "serve.json"
    n_out = 5
    bench.main(["--model", str(saved / "teacher"), "--student", str(saved / "student"), "--requests", "4",
                "--rate", "inf", "--prompt-len", "6", "--output-len", str(n_out), "--thresholds", "0.02",
                "--entropy-thresholds", "0.01", "--saturation-thresholds", "0.5", "--hf-batching", "--speculative", "2",
                "--out", str(out)])
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert {"(a)", "(b)", "(b′)", "(c)", "(c=)", "(d0)", "(d)", "(u d)"} <= set(rows)
    assert "LOWER BOUND" in rows["(u d)"]["label"] and "untrained" in rows["(u d)"]["model"]
    # Two independent engines, transformers' and ours, give the original model's greedy output.
    assert rows["(b′)"]["agreement"] == rows["(b′)"]["identical"] == 1.0
    assert rows["(b)"]["agreement"] == 1.0
    assert res["hf_batching"] == "measured" and "(b)/(b′)" in res["ratios"]
    # The rows without exit served the checkpoint on disk, token for token.
    reloaded, _ = rf.load_pretrained(str(saved / "student"))
    served = [(m, p, r) for m, p, e, r in calls if e is None and m.layout.num_loops == 2]
    assert len(served) == 2  # (c) and (c=)
    for _, prompts, r in served:
        for p, got in zip(prompts, r["tokens"]):
            ids = torch.tensor([p])
            ref = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
            assert got == ref[0, len(p):].tolist()
    assert rows["(c)"]["agreement"] == 1.0
    # Each policy: measured cost, agreement and speed, in the table's JSON.
    policies = {p["policy"]: p for p in res["policies"]}
    assert set(policies) == {"confidence", "entropy", "saturation", "classifier"}  # the student has a classifier file
    assert policies["classifier"]["threshold"] == 0.5 and "calibrated" in rows[policies["classifier"]["row"]]["label"]
    for p in policies.values():
        assert p["exit_checks"] > 0 and p["exit_us_per_check"] > 0 and p["exit_ms_per_step"] > 0
        assert 0 <= p["agreement"] <= 1 and p["output_tok_s"] > 0 and 1 <= p["mean_exit_depth"] <= 2
    assert rows["(c)"]["exit_checks"] == 0  # no exit: nothing offered, nothing paid
    # Lossless mode at batch 1: exactly the student's full-depth tokens, with its acceptance rate.
    assert rows["(s)"]["identical"] == rows["(s0)"]["identical"] == 1.0
    assert 0 <= rows["(s)"]["acceptance"] <= 1 and rows["(s)"]["draft_k"] == 2 and "(s)/(s0)" in res["ratios"]
    assert out.with_suffix(".png").exists()


def test_hf_batching_missing_is_reported_not_raised():
    import transformers

    assert hf_batching_unavailable() is None and hf_batching_unavailable(make("llama")) is None  # 5.x has it
    version = ".".join(transformers.__version__.split(".")[:2])
    assert hf_batching_unavailable(object()) == f"unavailable in transformers {version}"


def test_a_student_that_is_not_a_recursive_checkpoint_is_one_line(saved, tmp_path):
    with pytest.raises(StudentError, match="not a directory"):
        check_student(str(tmp_path / "missing"))
    with pytest.raises(StudentError, match="no config.json"):
        check_student(str(tmp_path))
    with pytest.raises(StudentError, match="a 'llama' model, not a recursive checkpoint"):
        check_student(str(saved / "teacher"))
    other = rf.load_pretrained(str(saved / "teacher"))[0].config
    other.vocab_size = 500
    with pytest.raises(StudentError, match="not a student of --model"):
        check_student(str(saved / "student"), other)
    assert check_student(str(saved / "student")).recursion["num_loops"] == 2
    # From the command line: non-zero exit, one line on stderr, before any weights are read.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "recursify", "bench-serve", "--model", str(saved / "teacher"),
                          "--student", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no config.json, so not a recursive checkpoint" in lines[0], res.stderr
