"""Tests for uptraining by distillation (recursify.train.{losses,trainer,plot}) on tiny random models.

The resume and distributed tests run the trainer in real subprocesses: a SIGTERM'd and then a
SIGKILL'd run, resumed, must log the same per-step losses as an uninterrupted one, and two gloo
processes, under DDP and under FSDP2, must match one process on the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import recursify as rf
from recursify.train import TrainConfig, TrainError, list_checkpoints, main, train
from recursify.train.losses import (DEFAULT_CHUNK_ELEMENTS, LossConfig, _exit_sums, distillation_loss, exit_weights,
                                    hidden_state_loss, next_token_labels)
from loss_reference import ce_loss, kd_ce_loss, kd_loss
from tiny_models import COMMON, make

SEQ = 16


def word_tokenizer(size: int = 97, shift: int = 0) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over w0..w{size-3}; `shift` permutes the ids (same size, other mapping)."""
    n = size - 2
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": 2 + (i + shift) % n for i in range(n)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def write_corpus(path: Path, docs: int = 300, seed: int = 0) -> Path:
    """Arithmetic word sequences (w_s, w_{s+k}, ...): learnable, and every document is distinct."""
    rng = random.Random(seed)
    lines = []
    for _ in range(docs):
        start, step = rng.randrange(95), rng.choice([1, 2, 3])
        lines.append(json.dumps({"text": " ".join(f"w{(start + step * k) % 95}" for k in range(rng.randrange(20, 40)))}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny llama teacher, its 2-loop r=4 recursive student, a corpus and a token cache."""
    root = tmp_path_factory.mktemp("train")
    tok = word_tokenizer()
    teacher = make("llama")
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    write_corpus(root / "data.jsonl")
    return root


def config(fx: Path, out: Path, **kw) -> TrainConfig:
    base = dict(student=str(fx / "student"), teacher=str(fx / "teacher"), data=[str(fx / "data.jsonl")],
                heldout_fraction=0.1, cache_dir=str(fx / "cache"), out=str(out), seq_len=SEQ, batch_size=8,
                max_tokens=8 * SEQ * 12, lr=1e-2, warmup_steps=2, alpha=0.5, exit_schedule="weighted",
                eval_every=0, eval_tokens=8 * SEQ, save_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def library_kd(student_logits, teacher_logits, temperature=1.0, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """The library's KD on ready-made logits: its chunked KL sum (`_exit_sums`, identity head) over
    every position, divided by the number of positions as `distillation_loss` does."""
    labels = torch.full(student_logits.shape[:-1], -100, dtype=torch.long)
    _, kd = _exit_sums(lambda x: x, student_logits, labels, teacher_logits, False, temperature, chunk_elements,
                       student_logits.shape[-1])
    return kd / labels.numel()


def test_kd_loss_matches_hand_computed_kl():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])
    t = torch.tensor([[[0.5, 2.5, 1.0], [2.0, 0.0, 0.0]]])
    for T in (1.0, 2.0):
        expected = 0.0
        for pos in range(2):
            ps = [math.exp(x / T) for x in s[0, pos].tolist()]
            pt = [math.exp(x / T) for x in t[0, pos].tolist()]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
        expected = expected / 2 * T * T
        assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)  # the reference
        assert library_kd(s, t, T).item() == pytest.approx(expected, rel=1e-6)  # the library
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert library_kd(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_chunked_kd_equals_unchunked_with_gradients():
    torch.manual_seed(0)
    s = torch.randn(2, 9, 11, requires_grad=True)
    t = torch.randn(2, 9, 11)
    full = library_kd(s, t, 2.0)
    (g_full,) = torch.autograd.grad(full, s)
    chunked = library_kd(s, t, 2.0, chunk_elements=2 * 11 * 2)  # 2 positions a chunk, recomputed in backward
    (g_chunk,) = torch.autograd.grad(chunked, s)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(g_chunk, g_full)
    # and both are the independent reference's KL, value and gradient
    ref = kd_loss(s, t, 2.0)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert full.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_full, g_ref)
    torch.testing.assert_close(g_chunk, g_ref)


@pytest.fixture(scope="module")
def tiny_pair():
    teacher = make("llama")
    student = rf.convert(teacher, rf.RecursionConfig(num_loops=3, lora_rank=2), progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logits = teacher(ids).logits
    return student, ids, t_logits


def test_alpha_zero_is_ce_and_alpha_one_is_kd(tiny_pair):
    student, ids, t_logits = tiny_pair
    with torch.no_grad():
        ref = student(ids, labels=ids, use_cache=False)
        ce_only = distillation_loss(student, ids, t_logits, LossConfig(alpha=0.0))
        kd_only = distillation_loss(student, ids, t_logits, LossConfig(alpha=1.0, temperature=2.0))
        mixed = distillation_loss(student, ids, t_logits, LossConfig(alpha=0.3))
    assert ce_only["loss"].item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert kd_only["loss"].item() == pytest.approx(kd_loss(ref.logits, t_logits, 2.0).item(), rel=1e-5)
    assert mixed["loss"].item() == pytest.approx(kd_ce_loss(ref.logits, t_logits, ids, alpha=0.3).item(), rel=1e-5)
    assert ce_loss(ref.logits, ids).item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_exit_weights_by_hand():
    assert exit_weights("none", 3) == [0.0, 0.0, 1.0]
    assert exit_weights("weighted", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert exit_weights("weighted", 2) == pytest.approx([1 / 3, 2 / 3])
    assert exit_weights("aggressive", 3) == [0.1, 0.1, 1.0]
    assert exit_weights("self_kd", 2) == [0.1, 1.0]
    assert exit_weights("weighted", 1) == [1.0]
    with pytest.raises(ValueError, match="unknown exit schedule"):
        exit_weights("deep", 2)


def test_exit_losses_combine_loop_states_by_hand(tiny_pair):
    student, ids, t_logits = tiny_pair
    alpha = 0.4
    with torch.no_grad():
        states = student(ids, output_loop_states=True, use_cache=False).loop_hidden_states
        exits = [student.exit_logits(h) for h in states]
        per_exit = [alpha * kd_loss(z, t_logits) + (1 - alpha) * ce_loss(z, ids) for z in exits]
        for schedule in ("weighted", "aggressive"):
            got = distillation_loss(student, ids, t_logits, LossConfig(alpha=alpha, exit_schedule=schedule))
            want = sum(w * x for w, x in zip(exit_weights(schedule, 3), per_exit))
            assert got["loss"].item() == pytest.approx(want.item(), rel=1e-5)
            assert got["exit_ce"].tolist() == pytest.approx([ce_loss(z, ids).item() for z in exits], rel=1e-5)
        # self_kd: the final exit as usual, intermediate exits towards the final exit's distribution
        got = distillation_loss(student, ids, t_logits, LossConfig(alpha=alpha, exit_schedule="self_kd"))
        want = per_exit[-1] + 0.1 * (kd_loss(exits[0], exits[-1]) + kd_loss(exits[1], exits[-1]))
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert next_token_labels(ids)[:, -1].eq(-100).all()


def test_self_kd_target_is_detached(tiny_pair):
    """The intermediate exits' self-distillation must not pull on the final exit's prediction:
    parameters used only after the last intermediate exit get the same gradient as with no exits."""
    student, ids, t_logits = tiny_pair

    def grads(schedule):
        student.zero_grad()
        distillation_loss(student, ids, t_logits, LossConfig(alpha=1.0, exit_schedule=schedule))["loss"].backward()
        return student.lora["o"].lora_B.grad.clone()

    plain, self_kd = grads("none"), grads("self_kd")
    student.zero_grad()
    last = student.layout.num_layers - 1  # only feeds the final exit
    torch.testing.assert_close(self_kd[last], plain[last])
    assert (self_kd[1] - plain[1]).abs().max() > 1e-6  # earlier positions do get the exit terms


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def test_training_reduces_heldout_loss_and_writes_a_checkpoint(fx, tmp_path):
    out = tmp_path / "run"
    result = train(config(fx, out, max_tokens=8 * SEQ * 30, eval_every=15))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3
    assert len(evals[-1]["exit_ppl"]) == 2 and all(p > 1 for p in evals[-1]["exit_ppl"])
    assert result["step"] == 30 and result["eval_ppl"] == pytest.approx(evals[-1]["ppl"])
    assert (out / "loss.png").stat().st_size > 1000
    model, _ = rf.load_pretrained(str(out))  # the final model is an ordinary recursify checkpoint
    assert isinstance(model, rf.RecursiveForCausalLM)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000030"]


def test_fit_steps_to_time_by_hand():
    from recursify.train.config import fit_steps_to_time

    assert fit_steps_to_time(step=3, seconds_left=10.0, seconds_per_step=2.0, max_steps=100) == 8
    assert fit_steps_to_time(step=3, seconds_left=10.0, seconds_per_step=2.0, max_steps=5) == 5
    assert fit_steps_to_time(step=3, seconds_left=-1.0, seconds_per_step=2.0, max_steps=100) == 3  # past it: stop now
    # a checkpoint after step 5 costs 10 s: steps 4-8 cost 5 x 2 + 10 = 20 s
    assert fit_steps_to_time(step=3, seconds_left=20.0, seconds_per_step=2.0, max_steps=100, save_every=5, save_s=10.0) == 8


def test_time_budget_ends_with_a_finished_model_and_a_decayed_lr(fx, tmp_path, monkeypatch):
    """A run that cannot finish max_tokens in max_time stops by the deadline, its cosine schedule
    re-fitted to the steps it could take (last LR at min_lr), with a final model and evaluation."""
    import recursify.train.trainer as trainer_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock.__setitem__("t", clock["t"] + 0.5) or clock["t"])
    out = tmp_path / "run"
    result = train(config(fx, out, max_tokens=8 * SEQ * 1000, max_time=40.0, warmup_steps=0, eval_every=0))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"]
    assert 3 < len(steps) < 1000 and result["step"] == len(steps) == result["total_steps"]
    last_lr_factor = steps[-1]["lr"] / 1e-2
    cfg = config(fx, out, warmup_steps=0)
    # At most the factor of a schedule planned for exactly these steps (a deadline met one step
    # early leaves the last step at min_lr), and decayed, not cut off near the peak.
    assert cfg.min_lr - 1e-9 <= last_lr_factor <= trainer_mod.lr_factor(len(steps) - 1, cfg, len(steps)) + 1e-9
    assert last_lr_factor < 0.2
    assert [r["step"] for r in recs if r["kind"] == "eval"][-1] == len(steps)
    model, _ = rf.load_pretrained(str(out))
    assert isinstance(model, rf.RecursiveForCausalLM)


def test_evaluations_pause_the_clock_only_when_asked(fx, tmp_path, monkeypatch):
    """Each evaluation costs 20 s of the fake clock. On wall time a 40 s budget pays for the
    evaluations and leaves a few steps; with eval_pauses_clock the steps alone spend the budget,
    as many as in a run with no evaluations at all."""
    import recursify.train.trainer as trainer_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock.__setitem__("t", clock["t"] + 0.5) or clock["t"])
    real_evaluate = trainer_mod.evaluate

    def slow_evaluate(*args, **kwargs):
        clock["t"] += 20.0
        return real_evaluate(*args, **kwargs)

    def steps(name: str, **kw) -> int:
        out = tmp_path / name
        train(config(fx, out, max_tokens=8 * SEQ * 1000, max_time=40.0, warmup_steps=0, **kw))
        return sum(json.loads(x)["kind"] == "train" for x in (out / "metrics.jsonl").read_text().splitlines())

    no_evals = steps("none", eval_every=-1)
    monkeypatch.setattr(trainer_mod, "evaluate", slow_evaluate)
    wall = steps("wall", eval_every=3)
    paused = steps("paused", eval_every=3, eval_pauses_clock=True)
    assert wall < no_evals / 3
    assert abs(paused - no_evals) <= 3


def test_wall_clock_budget_keeps_room_for_the_final_saves(fx, tmp_path, monkeypatch):
    """On wall time, max_time covers the whole call: with 5 s steps, 10 s checkpoints every 5 steps
    and a 5 s final save on a fake clock that moves only by them, a 120 s run plans its steps around
    the checkpoints and ends by the deadline, final saves included; counting the steps only
    (eval_pauses_clock), the final saves overrun it."""
    import recursify.train.trainer as trainer_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock["t"])

    def slow(real, seconds):
        def wrapped(*args, **kwargs):
            clock["t"] += seconds
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer_mod, "_step", slow(trainer_mod._step, 5.0))
    monkeypatch.setattr(trainer_mod, "save_checkpoint", slow(trainer_mod.save_checkpoint, 10.0))
    monkeypatch.setattr(trainer_mod, "_save_final", slow(trainer_mod._save_final, 5.0))

    def seconds(name: str, **kw) -> float:
        t0 = clock["t"]
        train(config(fx, tmp_path / name, max_tokens=8 * SEQ * 1000, max_time=120.0, warmup_steps=0, eval_every=-1,
                     save_every=5, **kw))
        return clock["t"] - t0

    # By hand: after step 12 (80 s: 12 steps, 2 checkpoints) 20 s are left once the final checkpoint
    # and model are reserved (2 x 10 s); step 15 would bring a checkpoint, so the run stops at step 14
    # (90 s), then saves (10 s + 5 s).
    assert seconds("wall") == 105.0
    assert seconds("steps", eval_pauses_clock=True) > 120.0


def changed_weights(fx: Path, out: Path) -> set[str]:
    """Names of the student's tensors that training `out` changed at all."""
    before = rf.RecursiveForCausalLM.from_pretrained(fx / "student").state_dict()
    after = rf.RecursiveForCausalLM.from_pretrained(out).state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_lora_only_training_leaves_shared_weights_bitwise_unchanged(fx, tmp_path):
    out = tmp_path / "lora"
    train(config(fx, out, trainable="lora", max_tokens=8 * SEQ * 3, eval_every=-1))
    changed = changed_weights(fx, out)
    assert changed and all(k.startswith("lora.") for k in changed)


def test_grad_accum_matches_one_big_batch(fx, tmp_path):
    a = config(fx, tmp_path / "a", max_tokens=8 * SEQ * 4, eval_every=-1)
    b = config(fx, tmp_path / "b", max_tokens=8 * SEQ * 4, eval_every=-1, grad_accum=4)
    la, lb = train(a) and train_losses(tmp_path / "a"), train(b) and train_losses(tmp_path / "b")
    assert la.keys() == lb.keys() == {1, 2, 3, 4}
    for k in la:
        assert lb[k] == pytest.approx(la[k], abs=1e-5)


RUNNER = textwrap.dedent("""
    import json, sys, time
    from recursify.train.trainer import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    delay = float(sys.argv[2])
    result = train(cfg, on_step=lambda record: time.sleep(delay))
    sys.exit(result.get("exit_code", 0))
""")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(script: Path, cfg: TrainConfig, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg.to_dict()), str(delay)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, newer_than: int, timeout: float = 90) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
        if steps and max(steps) > newer_than:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def test_resume_after_real_kill_matches_uninterrupted_run(fx, tmp_path):
    steps = 16
    kw = dict(max_tokens=8 * SEQ * steps, save_every=3, keep_last=2, exit_schedule="self_kd")
    train(config(fx, tmp_path / "ref", **kw))
    reference = train_losses(tmp_path / "ref")
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    out = tmp_path / "killed"

    # 1. SIGTERM: the step in flight finishes, a checkpoint is written at that step, exit 143.
    proc = _start(script, config(fx, out, **kw), delay=0.25)
    _wait_for_checkpoint(proc, out, newer_than=0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stopped_at = max(train_losses(out))
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at:07d}"
    assert stopped_at < steps

    # 2. resume, then SIGKILL (no chance to clean up) once a newer checkpoint exists.
    proc = _start(script, config(fx, out, resume=True, **kw), delay=0.25)
    _wait_for_checkpoint(proc, out, newer_than=stopped_at)
    time.sleep(0.3)  # let it log a step past the checkpoint, which the resume must discard
    proc.kill()
    proc.wait(timeout=30)
    assert max(int(p.name.split("-")[1]) for p in list_checkpoints(out)) < steps

    # 3. resume to the end, in process.
    result = train(config(fx, out, resume=True, **kw))
    assert result["step"] == steps and result["interrupted"] is None
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, steps + 1))
    for k in reference:
        assert resumed[k] == pytest.approx(reference[k], abs=1e-5), k


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(fx, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_tokens=8 * SEQ * 6, save_every=2, keep_last=3, eval_every=-1)
    train(config(fx, out, **kw))
    reference = train_losses(out)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004", "step-0000006"]
    model_file = list_checkpoints(out)[-1] / "model.safetensors"
    with open(model_file, "r+b") as f:
        f.truncate(model_file.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step-0000006 is corrupted.*falling back"):
        result = train(config(fx, out, resume=True, **kw))
    assert result["step"] == 6
    resumed = train_losses(out)
    assert resumed[5] == pytest.approx(reference[5], abs=1e-6) and resumed[6] == pytest.approx(reference[6], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear TrainError, nothing written to out/
# ------------------------------------------------------------------------------------------------


def _teacher_with(tmp_path: Path, name: str, vocab: int = 97, shift: int = 0) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": vocab}, num_key_value_heads=2))
    model.save_pretrained(tmp_path / name)
    word_tokenizer(vocab, shift).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("case", ["empty_data", "missing_data", "vocab_size", "token_ids", "max_tokens", "seq_len",
                                  "out_exists", "exits_on_plain_model"])
def test_bad_input_raises_before_writing(fx, tmp_path, case):
    out = tmp_path / "out"
    kw: dict = {}
    if case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        kw, match = dict(data=[str(tmp_path / "empty.jsonl")]), "empty"
    elif case == "missing_data":
        kw, match = dict(data=[str(tmp_path / "nope.txt")]), "not found"
    elif case == "vocab_size":
        kw, match = dict(teacher=str(_teacher_with(tmp_path, "t101", vocab=101))), "vocabulary of 101"
    elif case == "token_ids":
        kw, match = dict(teacher=str(_teacher_with(tmp_path, "tperm", shift=5))), "different ids"
    elif case == "max_tokens":
        kw, match = dict(max_tokens=8 * SEQ - 1), "smaller than one global batch"
    elif case == "seq_len":
        kw, match = dict(seq_len=129, max_tokens=8 * 129), "max_position_embeddings=128"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        match = "already exists"
    else:
        kw, match = dict(student=str(fx / "teacher"), exit_schedule="weighted"), "needs a recursive student"
    with pytest.raises(TrainError, match=match) as err:
        train(config(fx, out, **kw))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_cli_help_and_error_exit(fx, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--exit-schedule" in capsys.readouterr().out
    assert main(["--student", str(fx / "student"), "--out", str(tmp_path / "o"), "--alpha", "2"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes == 1 process on the same global batch
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(fx, tmp_path):
    kw = dict(max_tokens=8 * SEQ * 4, eval_every=0, exit_schedule="aggressive")
    single = config(fx, tmp_path / "single", **kw)
    train(single)
    args = ["--student", single.student, "--teacher", single.teacher, "--data", *single.data, "--cache-dir",
            single.cache_dir, "--heldout-fraction", "0.1", "--seq-len", str(SEQ), "--batch-size", "8",
            "--max-tokens", str(single.max_tokens), "--lr", "1e-2", "--warmup-steps", "2", "--alpha", "0.5",
            "--exit-schedule", "aggressive", "--eval-every", "0", "--eval-tokens", str(8 * SEQ),
            "--save-every", "0", "--no-progress", "--out", str(tmp_path / "ddp")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "recursify.train.trainer", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-5)
    ev = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]  # noqa
    assert ev(tmp_path / "ddp")["loss"] == pytest.approx(ev(tmp_path / "single")["loss"], abs=1e-5)


FSDP_ON_CPU = textwrap.dedent("""
    # accelerate turns FSDP on only for GPU-like devices and silently runs DDP on CPU; lift that one gate
    # so that accelerate's own FSDP2 path (fully_shard, DTensor clipping, state-dict gathering) runs here.
    import sys
    from accelerate import state
    from accelerate.utils import DistributedType
    from recursify.train.trainer import main

    init = state.AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init_fsdp_on_cpu
    sys.exit(main())
""")


def _cli(cfg: TrainConfig) -> list[str]:
    """The command line that gives `cfg`."""
    args = []
    for k, v in cfg.to_dict().items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            args += [flag, *map(str, v)]
        else:
            args += [flag, str(v)]
    return args


def test_fsdp_two_processes_match_one_and_resume(fx, tmp_path):
    """FSDP2 (through accelerate) on 2 gloo processes: same losses and final weights as one process,
    and a resume from a mid-run checkpoint (gathered optimizer state) lands on the same weights."""
    from safetensors.torch import load_file

    kw = dict(max_tokens=8 * SEQ * 4, eval_every=0, exit_schedule="aggressive")
    train(config(fx, tmp_path / "single", **kw))
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    env = {**_env(), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    out = tmp_path / "fsdp"

    def run(**extra) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script),
               *_cli(config(fx, out, save_every=2, keep_last=2, **kw, **extra))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run()
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert json.loads((out / "checkpoints" / "step-0000002" / "meta.json").read_text())["fsdp"] is True
    one, two = train_losses(tmp_path / "single"), train_losses(out)
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-5)
    ev = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]  # noqa
    assert ev(out)["loss"] == pytest.approx(ev(tmp_path / "single")["loss"], abs=1e-5)
    single, sharded = load_file(tmp_path / "single" / "model.safetensors"), load_file(out / "model.safetensors")
    assert single.keys() == sharded.keys()
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-4, rtol=0, msg=k)

    shutil.rmtree(list_checkpoints(out)[-1])
    run(resume=True)
    assert train_losses(out) == pytest.approx(two, abs=1e-6)
    resumed = load_file(out / "model.safetensors")
    for k in sharded:
        torch.testing.assert_close(resumed[k], sharded[k], atol=1e-6, rtol=0, msg=k)


def test_fsdp_checkpoint_resumed_without_fsdp_is_refused(fx, tmp_path):
    """Its optimizer state is keyed by parameter name, not by position: say so rather than fail inside torch."""
    from recursify.train.checkpoint import _hash_file

    out = tmp_path / "run"
    kw = dict(max_tokens=8 * SEQ * 2, save_every=2, eval_every=-1)
    train(config(fx, out, **kw))
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "fsdp": True}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["meta.json"] = {"size": (ckpt / "meta.json").stat().st_size,
                                      "blake2b": _hash_file(ckpt / "meta.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="written with FSDP; resume it with FSDP too"):
        train(config(fx, out, resume=True, **kw))


def test_save_every_minus_one_keeps_only_the_final_model(fx, tmp_path):
    out = tmp_path / "run"
    result = train(config(fx, out, save_every=-1))
    assert result["step"] == 12 and list_checkpoints(out) == []
    assert (out / "model.safetensors").exists()


def test_shared_lr_scale_sets_the_first_adamw_step_of_shared_weights():
    """Adam's first step moves every weight with a gradient by exactly its group's lr (m/sqrt(v) = sign g),
    so with no weight decay the largest change is lr for the LoRA and lr * shared_lr_scale for slots.*."""
    from recursify.train.optim import build_optimizer

    torch.manual_seed(0)
    student = rf.convert(make("llama"), rf.RecursionConfig(num_loops=2, lora_rank=4), progress=False)
    cfg = TrainConfig(student="x", lr=1e-3, shared_lr_scale=0.25, weight_decay=0.0)
    cfg.validate()
    optimizer = build_optimizer(cfg, student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student(torch.randint(0, COMMON["vocab_size"], (2, 8)), use_cache=False).logits.square().mean().backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in student.named_parameters()}
    shared = [v for n, v in moved.items() if n.startswith("slots.")]
    lora = [v for n, v in moved.items() if n.startswith("lora.")]
    assert shared and lora
    assert max(shared) == pytest.approx(0.25e-3, rel=1e-3) and max(lora) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(TrainError, match="shared_lr_scale"):
        TrainConfig(student="x", shared_lr_scale=0).validate()


# ------------------------------------------------------------------------------------------------
# Hidden-state distillation and the body trainable set
# ------------------------------------------------------------------------------------------------


def test_hidden_state_loss_by_hand():
    """Position 0 off by d, position 1 exact, the last position (after the final norm) ignored."""
    t = [torch.zeros(1, 2, 2), torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), torch.ones(1, 2, 2), torch.full((1, 2, 2), 9.0)]
    s = [t[1] + torch.tensor([[[0.0, 5.0], [0.0, 2.0]]]), t[2].clone(), torch.zeros(1, 2, 2)]
    # position 0: per token |d|^2 / |t|^2 = 25/25 and 4/1 -> mean 2.5; position 1: 0 -> mean over positions 1.25
    assert hidden_state_loss(s, t).item() == pytest.approx(1.25)


def test_hidden_loss_is_zero_at_full_rank_against_the_hf_teacher():
    """Position p's residual stream lines up with the Hugging Face teacher's hidden_states[p + 1]:
    the full-rank conversion reproduces it, a rank-0 one does not, and the weighted term is added."""
    teacher = make("llama")
    ids = torch.randint(0, COMMON["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
        full = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank="full"), progress=False)
        plain = rf.convert(teacher, rf.RecursionConfig(num_loops=2, lora_rank=0), progress=False)
        cfg = LossConfig(alpha=1.0, hidden_weight=0.5)
        exact = distillation_loss(full, ids, t_out.logits, cfg, teacher_hidden=t_out.hidden_states)
        off = distillation_loss(plain, ids, t_out.logits, cfg, teacher_hidden=t_out.hidden_states)
        kd_only = distillation_loss(plain, ids, t_out.logits, LossConfig(alpha=1.0))
    assert exact["hidden"].item() < 1e-9
    assert off["hidden"].item() > 1e-3
    assert off["loss"].item() == pytest.approx(kd_only["loss"].item() + 0.5 * off["hidden"].item(), rel=1e-5)


def test_hidden_weight_trains_and_refuses_a_plain_student(fx, tmp_path):
    result = train(config(fx, tmp_path / "hid", hidden_weight=1.0, max_tokens=8 * SEQ * 3, eval_every=-1))
    assert result["step"] == 3 and math.isfinite(result["loss"])
    # without KD (alpha=0) the teacher is still loaded for its hidden states
    ce_hidden = train(config(fx, tmp_path / "ce", alpha=0.0, hidden_weight=1.0, max_tokens=8 * SEQ * 2, eval_every=-1))
    assert ce_hidden["step"] == 2 and math.isfinite(ce_hidden["loss"])
    with pytest.raises(TrainError, match="needs a recursive student"):
        train(config(fx, tmp_path / "plain", student=str(fx / "teacher"), exit_schedule="none", hidden_weight=1.0))
    assert not (tmp_path / "plain").exists()


def test_body_training_leaves_the_embedding_bitwise_unchanged(fx, tmp_path):
    out = tmp_path / "body"
    train(config(fx, out, trainable="body", max_tokens=8 * SEQ * 3, eval_every=-1))
    changed = changed_weights(fx, out)
    assert any(k.startswith("slots.") for k in changed) and any(k.startswith("lora.") for k in changed)
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in changed)


def test_bf16_autocast_distils_as_well_as_fp32(fx, tmp_path):
    """--dtype bfloat16 on the CPU: float32 weights and Adam, forward and loss under bf16 autocast.
    After the same steps on the same batches its held-out loss is within 5 % of float32's."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        result = train(config(fx, tmp_path / dtype, max_tokens=8 * SEQ * 20, dtype=dtype, teacher_dtype="float32",
                              eval_every=0, exit_schedule="none"))
        losses[dtype] = result["eval_loss"]
    assert losses["bfloat16"] != losses["float32"]  # bf16 rounding did happen: autocast was on
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.05 * losses["float32"], losses


def test_train_takes_model_objects_and_trains_the_student_in_place(fx, tmp_path):
    """No path is read for a model passed in: the config's names may not even exist."""
    tok = word_tokenizer()
    teacher, _ = rf.load_pretrained(str(fx / "teacher"))
    student, _ = rf.load_pretrained(str(fx / "student"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = train(config(fx, tmp_path / "run", student="not/a/folder", teacher="not/a/folder/either",
                          max_tokens=8 * SEQ * 3), teacher=(teacher, tok), student=(student, tok))
    assert result["step"] == 3
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    reloaded, _ = rf.load_pretrained(str(tmp_path / "run"))
    for n, p in reloaded.named_parameters():
        torch.testing.assert_close(p, dict(student.named_parameters())[n], msg=n)
