"""The learned exit classifier: the fit against known linear rules, the threshold against hand
computation and a brute-force scan, the engine against replayed exits and full-depth `generate`,
the files, and the `recursify exits fit` command on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import recursify as rf
from recursify.engine import LLMEngine, ParamError, SamplingParams
from recursify.engine.exit_classifier import (
    CLASSIFIER_FILE,
    META_FILE,
    ExitClassifier,
    ExitClassifierError,
    calibrate_threshold,
    collect_features,
    fit_exit_classifier,
    fit_probe,
    predict,
)
from tiny_models import byte_tokenizer, make

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def convert(num_loops=2, strategy="cycle"):
    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=num_loops, lora_rank=4, strategy=strategy),
                       progress=False)
    model.generation_config.eos_token_id = None  # fixed-length references
    return model


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def constant(model, biases, threshold=0.5) -> ExitClassifier:
    """A classifier whose probe at boundary b says sigmoid(biases[b]) for every state."""
    clf = ExitClassifier(model.arch.hidden_size, model.layout.num_loops - 1, {"threshold": threshold})
    clf.bias.data = torch.tensor(biases, dtype=torch.float32)
    return clf


# ---------------------------------------------------------------- the fit
@pytest.mark.parametrize("positive", [0.5, 0.03])
def test_fit_recovers_a_known_linear_rule_balanced_or_not(positive):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g) * torch.linspace(0.2, 4.0, 24) + 1.5  # unequal scales, offset
    score = x @ torch.randn(24, generator=g)
    y = score > torch.quantile(score, 1 - positive)
    w, b = fit_probe(x, y)
    pred = x @ w + b > 0
    assert (pred == y).float().mean() >= 0.99
    assert (pred & y).sum() / y.sum() >= 0.9, "the rare class must not be given up"
    assert (pred & y).sum() / pred.sum() >= 0.9


def test_fit_generalises_and_single_class_is_the_base_rate():
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(16, generator=g)
    x = torch.randn(3000, 16, generator=g)
    w, b = fit_probe(x[:2000], x[:2000] @ truth > 0.8)
    held = x[2000:]
    assert ((held @ w + b > 0) == (held @ truth > 0.8)).float().mean() >= 0.98
    w1, b1 = fit_probe(x[:1000], torch.ones(1000, dtype=torch.bool))
    assert torch.equal(w1, torch.zeros(16)) and torch.sigmoid(b1) > 0.999
    w0, b0 = fit_probe(x[:1000], torch.zeros(1000, dtype=torch.bool))
    assert torch.sigmoid(b0) < 0.001


def test_features_and_labels_are_the_models_own_exits():
    """Labels against the model's own depth=1 forward; features are the final-normed loop-1 state."""
    model = convert(2)
    ids = torch.tensor(prompts([12, 12], seed=5))
    x, y = collect_features(model, [ids[:1], ids[1:]])
    with torch.no_grad():
        early = model(ids, depth=torch.tensor([1, 1])).logits.argmax(-1)
        full = model(ids).logits.argmax(-1)
        state = model(ids, output_loop_states=True).loop_hidden_states[0]
    assert x.shape == (1, 24, model.arch.hidden_size) and y.shape == (24, 1)
    assert torch.equal(y[:, 0], (early == full).reshape(-1))
    torch.testing.assert_close(x[0], model.final_norm(state).reshape(24, -1))
    assert 0 < int(y.sum()) < 24, "an untrained conversion should agree on some tokens, not all"
    clf = fit_exit_classifier(model, [ids], steps=50)
    assert clf.meta["tokens_fitted"] == 24 and clf.weight.shape == (1, model.arch.hidden_size)
    probs, agree = predict(clf, model, [ids])
    assert probs.shape == (24, 1) and torch.equal(agree, y) and bool(((probs >= 0) & (probs <= 1)).all())
    with pytest.raises(ExitClassifierError, match="no loop boundary"):
        collect_features(convert(2, "sequence"), [ids])


# ---------------------------------------------------------------- the threshold
def test_calibrate_threshold_by_hand_one_boundary():
    # Sorted by prob, the wrong exits are 0.7 and 0.5. Target 0.8 of 6 tokens allows 1 wrong:
    # t=0.5 exits 5 tokens with 2 wrong (4/6); t=0.6 exits 4 with 1 wrong (5/6 >= 0.8).
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    agree = torch.tensor([True, True, False, True, False, True])
    cal = calibrate_threshold(probs, agree, 0.8)
    assert cal.threshold == 0.6 and cal.exit_rate == 4 / 6 and cal.agreement == 5 / 6 and cal.met
    assert cal.boundary_exit_rate == (4 / 6,) and cal.boundary_agreement == (3 / 4,)
    every = calibrate_threshold(probs, agree, 4 / 6)  # everyone may exit: the lowest prob
    assert every.threshold == 0.4 and every.exit_rate == 1.0 and every.agreement == 4 / 6
    none = calibrate_threshold(probs, agree, 1.0)  # only the two top tokens are safe
    assert none.threshold == 0.8 and none.exit_rate == 2 / 6 and none.agreement == 1.0


def test_calibrate_threshold_by_hand_cascade_of_two_boundaries():
    # One shared t; a token leaves at its first boundary with p >= t. At t=0.6: token 0 leaves at
    # boundary 1 (right), token 1 at boundary 2 (right), token 2 never, token 3 at boundary 1
    # (wrong): 3/4 agreement. At t=0.4 token 2 leaves at boundary 2 (wrong) too: 2/4.
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.8], [0.2, 0.4], [0.6, 0.95]], dtype=torch.float64)
    agree = torch.tensor([[True, True], [False, True], [False, False], [False, True]])
    cal = calibrate_threshold(probs, agree, 0.75)
    assert cal.threshold == 0.6 and cal.exit_rate == 0.75 and cal.agreement == 0.75
    assert cal.boundary_exit_rate == (0.5, 0.25) and cal.boundary_agreement == (0.5, 1.0)


def _scan(probs, agree, target):
    """Brute force: every probability as a threshold, the cascade simulated token by token."""
    rows = probs.tolist()
    for t in sorted({p for row in rows for p in row if p > 0}):
        right = 0
        for row, ok in zip(rows, agree.tolist()):
            b = next((i for i, p in enumerate(row) if p >= t), None)
            right += 1 if b is None or ok[b] else 0
        if right / len(rows) >= target - 1e-12:
            return t, right / len(rows)
    return None


@pytest.mark.parametrize("seed", range(6))
def test_calibrate_threshold_equals_a_brute_force_scan(seed):
    g = torch.Generator().manual_seed(seed)
    n, nb = 60, 1 + seed % 3
    probs = torch.rand(n, nb, generator=g, dtype=torch.float64).round(decimals=2)  # ties on purpose
    agree = torch.rand(n, nb, generator=g) < probs.float() * 1.2
    target = [0.7, 0.8, 0.9][seed % 3]
    cal = calibrate_threshold(probs, agree, target)
    expected = _scan(probs, agree, target)
    assert expected is not None and (cal.threshold, cal.agreement) == pytest.approx(expected)


def test_calibrate_threshold_bad_input_and_unreachable_target():
    for bad in (0.0, 1.5, -1, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            calibrate_threshold(torch.tensor([0.5]), torch.tensor([True]), bad)
    cal = calibrate_threshold(torch.tensor([1.0, 0.5]), torch.tensor([False, True]), 1.0)
    assert cal.threshold == 1.0 and not cal.met and cal.agreement == 0.5


# ---------------------------------------------------------------- the engine
def test_always_exit_equals_replayed_exits_at_loop_one():
    model = convert(2)
    ps = prompts([5, 9, 4])
    out = LLMEngine(model, max_batch=3, max_model_len=64, exit="classifier",
                    exit_classifier=constant(model, [30.0])).generate(ps, GREEDY)
    replay = LLMEngine(model, max_batch=3, max_model_len=64, exit="replay")
    for p in ps:
        replay.add_request(p, GREEDY, exit_schedule=[2] + [1] * 7)
    expected = {}
    while replay.has_unfinished():
        for o in replay.step():
            expected[o.request_id] = o
    for o, e in zip(out, expected.values()):
        assert o.exit_depths == [2] + [1] * 7  # the first token comes from the full-depth prompt pass
        assert o.token_ids == e.token_ids
    # The first decoded token sees a full-depth cache: the model's own depth=1 forward predicts it.
    ids = torch.tensor([ps[0] + out[0].token_ids[:1]])
    with torch.no_grad():
        assert out[0].token_ids[1] == int(model(ids, depth=torch.tensor([1])).logits[0, -1].argmax())


def test_never_exit_equals_full_depth_generate_and_the_probe_reads_no_head():
    model = convert(2)
    ps = prompts([6, 3])
    engine = LLMEngine(model, max_batch=2, max_model_len=64, exit="classifier", exit_classifier=constant(model, [-30.0]))
    rows = []
    head = model.exit_logits
    model.exit_logits = lambda h: rows.append(h.shape[0]) or head(h)
    try:
        outs = engine.generate(ps, GREEDY)
    finally:
        del model.exit_logits
    for p, o in zip(ps, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert o.token_ids == ref[0, len(p):].tolist() and o.exit_depths == [2] * 8
    assert engine.runner.exit_checks == 14 and sum(rows) == 16  # the head ran for emitted tokens only


def test_each_boundary_reads_its_own_probe_on_the_models_device_and_dtype():
    """3 loops, probe 1 says stay and probe 2 says go: every decoded token leaves after loop 2,
    as replayed exits do. The model is bfloat16 and every step runs with `meta` as the default
    device, so a classifier tensor left in float32 or built off the model's device would show."""
    model = convert(3).to(torch.bfloat16)
    ps = prompts([5, 7])
    clf = constant(model, [-30.0, 30.0])
    engine = LLMEngine(model, max_batch=2, max_model_len=64, exit="classifier", exit_classifier=clf)
    assert clf.weight.dtype == torch.bfloat16 and clf.weight.device == model.embed_tokens.weight.device
    assert engine.runner.exit.threshold == 0.5  # the calibrated default
    step = engine.step

    def on_meta():
        with torch.device("meta"):
            return step()

    engine.step = on_meta
    outs = engine.generate(ps, GREEDY)
    replay = LLMEngine(model, max_batch=2, max_model_len=64, exit="replay")
    for p in ps:
        replay.add_request(p, GREEDY, exit_schedule=[3] + [2] * 7)
    expected = {}
    while replay.has_unfinished():
        expected.update({o.request_id: o for o in replay.step()})
    assert [o.exit_depths for o in outs] == [[3] + [2] * 7] * 2
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected.values()]


# ---------------------------------------------------------------- files and errors
def test_save_load_round_trip_and_the_engine_finds_it_next_to_the_checkpoint(tmp_path):
    model = convert(3)
    clf = ExitClassifier(model.arch.hidden_size, 2, {"threshold": 0.7, "target_agreement": 0.95})
    clf.weight.data = torch.randn(2, model.arch.hidden_size)
    clf.bias.data = torch.tensor([0.5, -1.5])
    model.save_pretrained(tmp_path)
    clf.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    back = ExitClassifier.load(tmp_path)
    assert torch.equal(back.weight, clf.weight) and torch.equal(back.bias, clf.bias)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["threshold"] == back.threshold == 0.7 and meta["boundaries"] == [1, 2] and meta["hidden_size"] == 64
    x = torch.randn(4, model.arch.hidden_size)
    torch.testing.assert_close(back(x, [0, 1, 1, 0]), torch.sigmoid((x * clf.weight[[0, 1, 1, 0]]).sum(-1) + clf.bias[[0, 1, 1, 0]]))
    loaded = rf.RecursiveForCausalLM.from_pretrained(tmp_path)
    engine = LLMEngine(loaded, max_batch=1, max_model_len=32, exit="classifier")  # found via the model's folder
    assert engine.runner.exit.threshold == 0.7
    assert LLMEngine(loaded, max_batch=1, max_model_len=32, exit="classifier", exit_threshold=0.9).runner.exit.threshold == 0.9


def _one_line(excinfo, *needles):
    text = str(excinfo.value)
    assert "\n" not in text and all(n in text for n in needles), text


def test_missing_mismatched_or_uncalibrated_classifier_is_one_line(tmp_path):
    model = convert(2)
    model.save_pretrained(tmp_path)
    loaded = rf.RecursiveForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        LLMEngine(loaded, max_batch=1, max_model_len=32, exit="classifier")
    _one_line(e, CLASSIFIER_FILE, "recursify exits fit")
    with pytest.raises(ValueError) as e:
        LLMEngine(model, max_batch=1, max_model_len=32, exit="classifier")  # converted in memory: no folder
    _one_line(e, "needs an exit classifier", "recursify exits fit")
    wrong_width = ExitClassifier(32, 1, {"threshold": 0.5})
    wrong_width.save(tmp_path)
    with pytest.raises(ValueError) as e:
        LLMEngine(loaded, max_batch=1, max_model_len=32, exit="classifier")
    _one_line(e, "hidden size 32", "hidden size 64", "refit")
    with pytest.raises(ValueError) as e:
        LLMEngine(model, max_batch=1, max_model_len=32, exit="classifier", exit_classifier=ExitClassifier(64, 2))
    _one_line(e, "2 loop boundaries", "has 1 (2 loops)")
    with pytest.raises(ParamError) as e:
        LLMEngine(model, max_batch=1, max_model_len=32, exit="classifier", exit_classifier=ExitClassifier(64, 1))
    _one_line(e, "no calibrated threshold")
    (tmp_path / CLASSIFIER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ExitClassifierError) as e:
        ExitClassifier.load(tmp_path)
    _one_line(e, "unreadable")


# ---------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    model = convert(2)
    model.save_pretrained(root / "rec")
    byte_tokenizer().save_pretrained(root / "rec")
    text = root / "text"
    text.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    for i in range(30):
        (text / f"doc{i}.txt").write_text(" ".join(words[(i * 3 + j * j) % 8] for j in range(60)))
    (root / "held.txt").write_text(" ".join(words[(j * 5) % 8] for j in range(400)))
    return root


def test_exits_fit_writes_both_files_and_prints_the_table(checkpoint, monkeypatch, capsys):
    from recursify.cli import main

    monkeypatch.setenv("RECURSIFY_CACHE", str(checkpoint / "cache"))
    rec = checkpoint / "rec"
    code = main(["exits", "fit", str(rec), "--data", str(checkpoint / "text"), "--heldout", str(checkpoint / "held.txt"),
                 "--target-agreement", "0.9", "--tokens", "1024", "--heldout-tokens", "256", "--seq-len", "64",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    meta = json.loads((rec / META_FILE).read_text())
    assert meta["target_agreement"] == 0.9 and meta["tokens_fitted"] == 1024 and meta["heldout_tokens"] == 256
    assert meta["boundaries"] == [1] and 0 < meta["threshold"] <= 1
    assert meta["heldout_agreement"] >= 0.9 and 0 <= meta["heldout_exit_rate"] <= 1
    for word in ("boundary", "exit rate", "agreement", "threshold", "after loop 1"):
        assert word in captured.out
    engine = LLMEngine(rf.RecursiveForCausalLM.from_pretrained(rec), max_batch=1, max_model_len=32, exit="classifier")
    assert engine.runner.exit.threshold == meta["threshold"]


def test_exits_fit_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    from recursify.cli import main

    rec, data = str(checkpoint / "rec"), str(checkpoint / "text")

    def error(*args):
        code = main(["exits", "fit", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and err[0].startswith("error"), err
        return err[0]

    make("llama").save_pretrained(tmp_path / "plain")
    convert(2, "sequence").save_pretrained(tmp_path / "seq")
    capsys.readouterr()  # the saves' progress bars
    assert "--target-agreement must be in (0, 1]" in error(rec, "--data", data, "--target-agreement", "1.5")
    assert "--target-agreement must be in (0, 1]" in error(rec, "--data", data, "--target-agreement", "0")
    assert "not a recursive checkpoint" in error(str(tmp_path), "--data", data)
    assert "a 'llama' model, not a recursive checkpoint" in error(str(tmp_path / "plain"), "--data", data)
    assert "no loop boundary" in error(str(tmp_path / "seq"), "--data", data)
    res = main(["exits", "fit", "--help"])
    help_text = capsys.readouterr().out
    assert res == 0 and "--target-agreement" in help_text and "--heldout" in help_text and "classifier" in help_text
