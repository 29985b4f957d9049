"""Exit policies: scores against hand-computed numbers, threshold validation, the one defaulting
rule, and the engine's exit decisions against the model's own loop states."""

from __future__ import annotations

import math

import pytest
import torch

import recursify as rf
from recursify.engine import ExitConfig, LLMEngine, ParamError, SamplingParams, resolve_exit
from recursify.engine.exit_policy import ExitPolicy, entropy_confidence, forced_depth, max_softmax, saturation
from tiny_models import make


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- scores, by hand
def test_max_softmax_and_entropy_by_hand():
    # p = (1/2, 1/4, 1/4): max 0.5; H = 1.5 ln 2; 1 - H/ln 3 = 0.053605...
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])) + 7.0  # shift-invariant
    torch.testing.assert_close(max_softmax(logits), torch.tensor([0.5, 1 / 3]))
    expected = 1 - 1.5 * math.log(2) / math.log(3)
    torch.testing.assert_close(entropy_confidence(logits), torch.tensor([expected, 0.0]), atol=1e-6, rtol=0)
    assert abs(expected - 0.0536053) < 1e-6
    one_hot = torch.tensor([[0.0, -1e4, -1e4]])
    torch.testing.assert_close(entropy_confidence(one_hot), torch.tensor([1.0]))


def test_saturation_is_cosine_by_hand():
    h = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    prev = torch.tensor([[1.0, 0.0], [6.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(saturation(h, prev), torch.tensor([1 / math.sqrt(2), 1.0, -1.0]))
    # bf16 states are scored in float32
    assert saturation(h.bfloat16(), prev.bfloat16()).dtype == torch.float32


class _Item:
    def __init__(self, loop=0, done=0, schedule=None):
        self.loop, self.loop_argmax = loop, []
        self.request = type("R", (), {"exit_schedule": schedule, "output_token_ids": [0] * done})()


def test_decisions_sit_on_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]))
    items = [_Item(), _Item()]
    assert ExitPolicy(ExitConfig("confidence", 0.5)).decisions([0, 0], [None, None], None, None, logits)[0] == [True, True]
    assert ExitPolicy(ExitConfig("confidence", 0.6)).decisions([0, 0], [None, None], None, None, logits)[0] == [False, True]
    assert ExitPolicy(ExitConfig("confidence", 0.71)).decisions([0, 0], [None, None], None, None, logits)[0] == [False, False]
    # entropy: row 0 scores 0.0536, row 1: 1 - H(0.7, 0.2, 0.1)/ln 3
    h1 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    s1 = 1 - h1 / math.log(3)
    assert ExitPolicy(ExitConfig("entropy", 0.05)).decisions([0, 0], [None, None], None, None, logits)[0] == [True, True]
    assert ExitPolicy(ExitConfig("entropy", (0.0536 + s1) / 2)).decisions([0, 0], [None, None], None, None, logits)[0] == [False, True]
    h = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    prev = torch.tensor([[1.0, 0.0], [6.0, 0.1]])
    cos1 = 18 / (3 * math.sqrt(36.01))
    assert ExitPolicy(ExitConfig("saturation", 0.70)).decisions([0, 0], [None, None], h, prev, None)[0] == [True, True]
    assert ExitPolicy(ExitConfig("saturation", 0.71)).decisions([0, 0], [None, None], h, prev, None)[0] == [False, True]
    assert ExitPolicy(ExitConfig("saturation", cos1 + 1e-4)).decisions([0, 0], [None, None], h, prev, None)[0] == [False, False]
    # replay: token n leaves after schedule[n] loops; oracle never leaves, records argmax
    replay = ExitPolicy(ExitConfig("replay"))
    replayed = [_Item(0, 1, [3, 1]), _Item(0, 0, [3, 1]), _Item(1, 2, [3, 1])]
    assert [forced_depth(it.request) for it in replayed] == [1, 3, None]  # token n of the schedule
    assert replay.decisions([0, 0, 1], [1, 3, None], None, None, None)[0] == [True, False, False]
    oracle = ExitPolicy(ExitConfig("oracle"))
    assert oracle.decisions([0, 0], [None, None], None, None, logits) == ([False, False], [0, 0])
    items[0].loop_argmax = [0]  # what the scheduler records of loop 1's argmax (update_from_output)
    assert oracle.final_depth(items[0], 0, 3) == 1  # the full-depth argmax 0 was loop 1's
    assert oracle.final_depth(items[0], 1, 3) == 3  # no earlier loop agreed with argmax 1


# ---------------------------------------------------------------- validation and defaults
@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_threshold_outside_zero_one_is_one_clear_line(bad):
    with pytest.raises(ParamError) as e:
        ExitConfig("confidence", bad)
    assert e.value.param == "exit_threshold"
    assert "(0, 1]" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ParamError):
        resolve_exit(None, bad)


def test_unknown_mode_is_one_clear_line():
    with pytest.raises(ParamError, match="unknown exit mode 'sometimes'; choose one of none, confidence") as e:
        resolve_exit("sometimes")
    assert e.value.param == "exit_mode"


def test_one_defaulting_rule():
    assert resolve_exit() == ExitConfig("none", 0.9)
    assert resolve_exit(None, 0.8) == ExitConfig("confidence", 0.8)
    assert resolve_exit("entropy") == ExitConfig("entropy", 0.9)
    assert resolve_exit("saturation", 1.0) == ExitConfig("saturation", 1.0)
    cfg = ExitConfig("entropy", 0.7)
    assert resolve_exit(cfg) is cfg and resolve_exit(cfg, 0.7) is cfg
    with pytest.raises(ParamError, match="given twice"):
        resolve_exit(cfg, 0.8)


def test_classifier_mode_defaults_to_the_calibrated_threshold():
    assert ExitConfig("confidence").threshold == 0.9 and ExitConfig("classifier").threshold is None
    assert resolve_exit("classifier") == ExitConfig("classifier", None)
    assert resolve_exit("classifier", 0.7) == ExitConfig("classifier", 0.7)
    assert resolve_exit(ExitConfig("classifier"), 0.8) == ExitConfig("classifier", 0.8)
    with pytest.raises(ParamError, match=r"\(0, 1\]"):
        resolve_exit("classifier", 1.5)


def test_classifier_scores_by_hand():
    from recursify.engine.exit_classifier import ExitClassifier

    clf = ExitClassifier(2, 2, {"threshold": 0.6})
    clf.weight.data = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    clf.bias.data = torch.tensor([0.0, -1.0])
    h = torch.tensor([[0.5, 9.0], [9.0, 1.0], [0.2, 0.0]])
    loops = [0, 1, 0]  # rows 0 and 2 read probe 1, row 1 probe 2: logits 0.5, 2 - 1 = 1, 0.2
    policy = ExitPolicy(ExitConfig("classifier"), clf)  # no norm given: the identity
    assert policy.config.threshold == 0.6  # sigmoid: 0.6225, 0.7311, 0.5498
    assert policy.decisions(loops, [None] * 3, h, None, None) == ([True, True, False], None)
    doubled = ExitPolicy(ExitConfig("classifier", 0.74), clf, norm=lambda x: 2 * x)  # logits 1, 3, 0.4
    assert doubled.decisions(loops, [None] * 3, h, None, None) == ([False, True, False], None)
    assert not policy.uses_head and not policy.needs_previous
    with pytest.raises(ParamError, match="needs an exit classifier"):
        ExitPolicy(ExitConfig("classifier"))


# ---------------------------------------------------------------- the engine's decisions
def _model(num_loops=3):
    model = rf.convert(make("llama"), rf.RecursionConfig(num_loops=num_loops, lora_rank=4), progress=False)
    model.generation_config.eos_token_id = None
    return model


def _prompts(n, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("mode", ["confidence", "entropy", "saturation"])
def test_engine_exits_where_the_rule_says_on_the_models_own_states(mode):
    """The first decoded token of each request sees a full-depth cache, so a plain forward over
    prompt + first token gives its exact loop-end states; the rule applied to them by hand must
    give the engine's exit depth and token. The threshold splits the requests at loop 1."""
    model = _model(3)
    ps = _prompts(6)
    first = LLMEngine(model, max_batch=6, max_model_len=64).generate(ps, SamplingParams(max_tokens=1, ignore_eos=True))
    scores, preds = [], []
    for p, o in zip(ps, first):
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            states = [s[0, -1] for s in model(ids, output_loop_states=True).loop_hidden_states]
            loop_input = model.embed(ids)[0, -1]  # cycle layout: loop 1 starts from the embedding
            logits = [model.exit_logits(s) for s in states]
        if mode == "saturation":
            ends = [loop_input] + states
            s = [float(torch.nn.functional.cosine_similarity(ends[b + 1], ends[b], dim=0)) for b in range(2)]
        elif mode == "confidence":
            s = [float(torch.softmax(x, -1).max()) for x in logits[:2]]
        else:
            pr = [torch.softmax(x.double(), -1) for x in logits[:2]]
            s = [float(1 + (q * q.log()).sum() / math.log(q.numel())) for q in pr]
        scores.append(s)
        preds.append([int(x.argmax()) for x in logits])
    at1 = sorted(s[0] for s in scores)
    tau = (at1[2] + at1[3]) / 2
    assert 0 < tau <= 1 and at1[3] - at1[2] > 1e-4, "prompts too close to call"
    expected = [1 if s[0] >= tau else 2 if s[1] >= tau else 3 for s in scores]
    assert expected.count(1) == 3
    engine = LLMEngine(model, max_batch=6, max_model_len=64, exit=mode, exit_threshold=tau)
    outs = engine.generate(ps, SamplingParams(max_tokens=2, ignore_eos=True))
    for o, f, d, pr in zip(outs, first, expected, preds):
        assert o.token_ids[0] == f.token_ids[0] and o.exit_depths[0] == 3  # the prompt pass is full depth
        assert o.exit_depths[1] == d
        assert o.token_ids[1] == pr[d - 1]
    assert engine.runner.exit_checks >= 6 and engine.runner.exit_seconds > 0


def test_saturation_reads_the_head_only_for_tokens_it_emits():
    model = _model(2)
    ps = _prompts(3)
    rows = []
    head = model.exit_logits

    def counted(h):
        rows.append(h.shape[0])
        return head(h)

    model.exit_logits = counted
    engine = LLMEngine(model, max_batch=3, max_model_len=64, exit="saturation", exit_threshold=1.0)
    outs = engine.generate(ps, SamplingParams(max_tokens=5, ignore_eos=True))
    assert sum(rows) == sum(len(o.token_ids) for o in outs) == 15
    assert engine.runner.exit_checks == 12  # every decoded token was offered the exit at loop 1
