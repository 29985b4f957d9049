"""The compress time planner, pure: its decisions for given speeds and budgets, checked against
numbers worked out by hand here (never against the planner's own helpers), and the typed resume
record. No model, no clock: milliseconds.

The costs, in teacher forwards (compress/plan.py): statistics 4 a calibration token, a conversion
10k (40k with the calibrated shared-weight fit), the refit 12 a token of at most 8192, the
curvature 4 a token + 20k + 20k with the refit, a KD step 5 a token; the end keeps
(6 * eval tokens + 3000) / speed + 5 s. With 256-token sequences, batches of 4 and 4096
evaluation tokens, at 1000 tok/s: reserve 32.576 s, a step 5.12 s, reserve + 10 steps 83.776 s.
"""

from __future__ import annotations

import json

import pytest

from recursify.compress import CompressConfig, CompressError
from recursify.compress.plan import Available, Costs, local_seconds, plan_distillation, plan_preparation
from recursify.compress.state import RunState, identity

PLENTY = 10**9  # calibration tokens: more than any plan asks for

SEARCH = ("      the budget is too short to compare 3 layouts; using 10 loops at rank 96 "
          "(raise --time-budget to let it choose)")
CURVATURE = ("      the budget is too short for the output curvature; fitting input-side only "
             "(raise --time-budget to keep it)")
INIT = ("      the budget is too short for the calibrated shared-weight fit; using average init "
        "(raise --time-budget to keep it)")
SEQUENTIAL = "      the budget is too short for the sequential refit; skipping it (raise --time-budget to keep it)"


def calib(n: int) -> str:
    return f"      calibrating on {n} tokens instead of 16384 to fit the budget"


def demo(**kw) -> CompressConfig:
    """scripts/demo.sh's request."""
    base = dict(model="smollm2-135m", loops=10, lora_rank="auto", target_params=0.75, calib_tokens=16384,
                max_tokens=45056, gradient_checkpointing="on", time_budget=1800.0)
    return CompressConfig(**{**base, **kw})


def searching(**kw) -> CompressConfig:
    """--loops auto for 75 % of the teacher, everything else the defaults."""
    return CompressConfig(**{**dict(loops="auto", target_params=0.75, calib_tokens=16384, time_budget=60.0), **kw})


LAYOUTS = Available(calib_tokens=PLENTY, layouts=3, fallback=(10, "96"))


def decisions(p):
    return p.calib_tokens, p.calib_rows, p.probe, p.search, p.curvature, p.init, p.sequential, p.lines


# (a) ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("speed, prep_s, refit_s, left, kd_s", [
    # 100 tok/s: statistics 655.36 + conversion 400; refit 983.04 + curvature 727.68; reserve 280.76
    (100.0, 1055.36, 1710.72, 4200.0, 4200.0 - 280.76),
    (1000.0, 105.536, 171.072, 6900.0, 6900.0 - 32.576),
])
def test_an_ample_budget_keeps_everything_and_the_demo_does_the_same_work_at_any_speed(speed, prep_s, refit_s, left,
                                                                                        kd_s):
    cfg = demo()
    prep = plan_preparation(cfg, Costs(fwd_tok_s=speed, eval_tokens=4096), 7200.0, Available(calib_tokens=PLENTY))
    assert decisions(prep) == (16384, 64, None, False, True, "calibrated", True, ())
    assert prep.seconds == pytest.approx(prep_s) and prep.refit_seconds == pytest.approx(refit_s)
    kd = plan_distillation(cfg, Costs(fwd_tok_s=speed, eval_tokens=4096), left)
    # 45056 tokens are 44 steps of 1024, fewer than the time allows at either speed: a tenth of 44
    # is below both floors, so 5 warm-up steps and a checkpoint every 10, wherever the demo runs
    assert (kd.max_tokens, kd.warmup_steps, kd.save_every) == (45056, 5, 10)
    assert kd.seconds == pytest.approx(kd_s)


def test_the_demo_at_100_tok_s_needs_3559_seconds_left_for_everything():
    """1055.36 + 1710.72 + 280.76 + 10 * 51.2 = 3558.84; without the curvature 2831.16."""
    costs = Costs(fwd_tok_s=100.0, eval_tokens=4096)
    assert plan_preparation(demo(), costs, 3559.0, Available(calib_tokens=PLENTY)).lines == ()
    short = plan_preparation(demo(), costs, 3558.0, Available(calib_tokens=PLENTY))
    assert decisions(short) == (16384, 64, None, False, False, "calibrated", True, (CURVATURE,))


# (b) ---------------------------------------------------------------------------------------------

# --loops auto at 1000 tok/s. Each step's need (preparation + refit + 83.776):
#   search + curvature, 16384: 65.536 + 40 + 3 * 10 + 98.304 + 72.768 -> 390.384
#   no search:                 105.536 + 171.072                       -> 360.384
#   no curvature:              105.536 + 98.304                        -> 287.616
#   8192: 72.768 + 98.304 -> 254.848;  4096: 56.384 + 49.152 -> 189.312;  2048: 48.192 + 24.576 -> 156.544
#   average init: 18.192 + 24.576 -> 126.544 (below it, no refit); one step: 18.192 + 32.576 + 5.12 = 55.888
@pytest.mark.parametrize("left, lines, calib_tokens, rows, probe", [
    (400.0, (), 16384, 64, (64, 72)),  # 8 rows of 256 past the statistics score the layouts
    (370.0, (SEARCH,), 16384, 64, None),
    (300.0, (SEARCH, CURVATURE), 16384, 64, None),
    (260.0, (SEARCH, CURVATURE, calib(8192)), 8192, 32, None),
    (200.0, (SEARCH, CURVATURE, calib(4096)), 4096, 16, None),
    (160.0, (SEARCH, CURVATURE, calib(2048)), 2048, 8, None),
    (150.0, (SEARCH, CURVATURE, calib(2048), INIT), 2048, 8, None),
    (100.0, (SEARCH, CURVATURE, calib(2048), INIT, SEQUENTIAL), 2048, 8, None),
])
def test_a_tight_budget_gives_up_work_in_the_documented_order(left, lines, calib_tokens, rows, probe):
    prep = plan_preparation(searching(), Costs(fwd_tok_s=1000.0, eval_tokens=4096), left, LAYOUTS)
    assert prep.lines == lines
    assert (prep.calib_tokens, prep.calib_rows, prep.probe) == (calib_tokens, rows, probe)
    assert (prep.search, prep.curvature) == (SEARCH not in lines, CURVATURE not in lines)
    assert (prep.init, prep.sequential) == ("average" if INIT in lines else "calibrated", SEQUENTIAL not in lines)


def test_without_the_search_the_curvature_goes_first_and_cached_statistics_cost_nothing():
    costs = Costs(fwd_tok_s=1000.0, eval_tokens=4096)
    fixed = demo()  # 10 loops: needs 360.384 with the curvature, 287.616 without
    prep = plan_preparation(fixed, costs, 300.0, Available(calib_tokens=PLENTY))
    assert decisions(prep) == (16384, 64, None, False, False, "calibrated", True, (CURVATURE,))
    assert plan_preparation(fixed, costs, 260.0, Available(calib_tokens=PLENTY)).lines == (CURVATURE, calib(8192))
    # cached statistics of those 16384 tokens: 40 + 171.072 + 83.776 = 294.848, the curvature fits
    cached = plan_preparation(fixed, costs, 300.0, Available(calib_tokens=PLENTY, cached=frozenset({16384})))
    assert cached.lines == () and cached.curvature and cached.seconds == pytest.approx(40.0)


def test_a_max_tokens_cap_below_ten_steps_leaves_their_time_to_the_conversion():
    """--max-tokens 4096 is 4 steps of 1024: the preparation keeps room for 4 of them,
    32.576 + 4 * 5.12 = 53.056, so everything fits in 105.536 + 171.072 + 53.056 = 329.664 s,
    where room for ten steps needs 360.384; a cap below one step still keeps room for one."""
    costs, text = Costs(fwd_tok_s=1000.0, eval_tokens=4096), Available(calib_tokens=PLENTY)
    assert plan_preparation(demo(max_tokens=4096), costs, 329.7, text).lines == ()
    assert plan_preparation(demo(max_tokens=4096), costs, 329.6, text).lines == (CURVATURE,)
    assert plan_preparation(demo(), costs, 329.7, text).lines == (CURVATURE,)
    # 100 tokens: one step's room, 105.536 + 171.072 + 32.576 + 5.12 = 314.304
    assert plan_preparation(demo(max_tokens=100), costs, 314.4, text).lines == ()
    assert plan_preparation(demo(max_tokens=100), costs, 314.2, text).lines == (CURVATURE,)


def test_the_memory_plan_or_an_earlier_attempt_can_have_given_up_the_fits_already():
    prep = plan_preparation(demo(), Costs(fwd_tok_s=1000.0, eval_tokens=4096), 7200.0, Available(calib_tokens=PLENTY),
                            curvature=False, sequential=False)
    assert (prep.curvature, prep.sequential, prep.lines) == (False, False, ())
    assert prep.refit_seconds == 0


@pytest.mark.parametrize("tokens, rows, probe", [
    (16384 + 1024, 64, (64, 68)),  # 4 rows past the statistics: the search scores on those
    (2560, 5, (5, 10)),  # less text than the statistics want: halves
])
def test_the_search_scores_on_text_the_statistics_did_not_see(tokens, rows, probe):
    prep = plan_preparation(searching(), Costs(fwd_tok_s=1000.0, eval_tokens=4096), 7200.0,
                            Available(calib_tokens=tokens, layouts=3, fallback=(10, "96")))
    assert (prep.search, prep.calib_rows, prep.probe) == (True, rows, probe)


def test_the_distillation_schedule_follows_the_fewer_of_the_time_s_and_the_tokens_steps():
    costs = Costs(fwd_tok_s=1000.0, eval_tokens=4096)
    cfg = CompressConfig(loops=2, lora_rank=8)
    # 600 s of KD: 117 steps of 5.12 s; max_tokens from twice that: 234 steps of 1024 tokens
    kd = plan_distillation(cfg, costs, 632.576)
    assert (kd.max_tokens, kd.warmup_steps, kd.save_every) == (234 * 1024, 11, 11)
    assert kd.seconds == pytest.approx(600.0)
    # a resumed run keeps its first attempt's tokens; then their 300 steps are more than 117
    assert plan_distillation(cfg, costs, 632.576, max_tokens=300 * 1024).max_tokens == 300 * 1024
    # 200 steps: a tenth of them, 20, is the most warm-up there is
    capped = CompressConfig(loops=2, lora_rank=8, max_tokens=200 * 1024)
    assert plan_distillation(capped, costs, 10**6).warmup_steps == 20
    local = CompressConfig(loops=2, lora_rank=8, local_fraction=0.3)
    assert local_seconds(local, costs, 1032.576) == pytest.approx(300)


# (c) ---------------------------------------------------------------------------------------------

def test_a_budget_that_cannot_fit_calibration_and_one_step_is_refused():
    with pytest.raises(CompressError, match=r"^the time budget \(1m00s\) cannot fit calibration \(about 0m18s here\) "
                                            r"and one training step; raise --time-budget$") as e:
        plan_preparation(searching(), Costs(fwd_tok_s=1000.0, eval_tokens=4096), 50.0, LAYOUTS)
    assert e.value.lines == (SEARCH, CURVATURE, calib(2048), INIT, SEQUENTIAL)  # given up first, for the log
    # 36 s left: 3.424 s of training after the reserve, less than a 5.12 s step
    with pytest.raises(CompressError, match=r"^the time budget leaves 3 s for training, less than one step "
                                            r"\(about 5 s here\); raise --time-budget$"):
        plan_distillation(demo(), Costs(fwd_tok_s=1000.0, eval_tokens=4096), 36.0)


# the resume record -------------------------------------------------------------------------------

def test_run_state_round_trips_and_a_resumed_run_keeps_its_first_attempt_s_choices(tmp_path):
    cfg = demo()
    path = tmp_path / "state.json"
    first = RunState(config=identity(cfg), spent=412.5, teacher_ppl=21.75, fwd_tok_s=1000.0, sequential=False,
                     curvature=False, layout_search=[{"loops": 10, "rank": "96", "params": 101, "ppl": 40.5}],
                     before=88.25, student_params=101, max_tokens=45056, calib_seconds=300.25)
    first.save(path)
    again = RunState.load(path)
    assert again == first and json.loads(path.read_text())["max_tokens"] == 45056
    assert RunState.load(tmp_path / "absent.json") is None
    # what only decides the evaluation may change on resume; a training setting may not
    assert again.matches(demo(paper_tasks=5, baseline=True, overwrite=True)) and not again.matches(demo(lr=5e-3))
    costs = Costs(fwd_tok_s=again.fwd_tok_s, eval_tokens=4096)
    prep = plan_preparation(cfg, costs, 7200.0 - again.spent, Available(calib_tokens=PLENTY),
                            curvature=again.curvature, sequential=again.sequential)
    assert (prep.curvature, prep.sequential) == (False, False)
    assert plan_distillation(CompressConfig(loops=2, lora_rank=8), costs, 1000.0, again.max_tokens).max_tokens == 45056
    again.update(train_tokens=45056, train_steps=44, train_seconds=220.5)
    again.save(path)
    assert RunState.load(path).train_steps == 44 and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(AttributeError):
        again.update(steps=3)


def test_a_record_from_before_the_typed_state_still_loads(tmp_path):
    """What the untyped dict wrote: only the keys set so far."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"config": identity(demo()), "spent": 3.5, "teacher_ppl": 30.25, "fwd_tok_s": 900.0}))
    state = RunState.load(path)
    assert (state.spent, state.fwd_tok_s, state.sequential, state.curvature) == (3.5, 900.0, True, True)
    assert state.max_tokens is None and state.layout_search is None


@pytest.mark.parametrize("text, match", [
    ("{not json", "cannot read"),
    ("[1, 2]", r"not a recursify compress state \(a JSON list"),
    ('{"config": {}, "step": 3}', "unknown fields step"),
    ('{"spent": 2.0}', "no config"),
    ('{"config": {}, "spent": "soon"}', "spent is 'soon'"),
    ('{"config": {}, "max_tokens": true}', "max_tokens is True"),
])
def test_an_unreadable_or_foreign_state_file_is_a_one_line_error(tmp_path, text, match):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(CompressError, match=match) as e:
        RunState.load(path)
    assert "\n" not in str(e.value) and "--overwrite" in str(e.value)
