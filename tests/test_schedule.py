"""One loop schedule, two executors: the model's forward and the engine's runner both run
`Layout.schedule()`, and the runner's loop ends are the model's own loop states.

If either executor walked its own table (another order, another loop end, a missing prelude or
coda) these tests fail, before any greedy-equality test has to find it indirectly.
"""

from __future__ import annotations

import pytest
import torch

import recursify as rf
from recursify.config import BLOCK, CODA, PRELUDE, Layout
from recursify.engine import Batch, KVCache, ModelRunner, Row
from tiny_models import make


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def convert(family="llama", **kw):
    kw.setdefault("num_loops", 2)
    kw.setdefault("lora_rank", 4)
    return rf.convert(make(family), rf.RecursionConfig(**kw), progress=False).eval()


@pytest.mark.parametrize("strategy,L,B", [("cycle", 6, 2), ("middle_cycle", 8, 3), ("sequence", 6, 2),
                                          ("middle_sequence", 8, 3), ("cycle", 6, 1)])
def test_schedule_walks_every_position_once_in_order(strategy, L, B):
    layout = Layout.build(L, rf.RecursionConfig(num_loops=B, strategy=strategy))
    steps = layout.schedule()
    assert [s.position for s in steps] == list(range(L))
    assert tuple(s.slot for s in steps) == layout.slot_of_position
    # The loops, concatenated, are the schedule; each ends at exactly one loop end, the last after the coda.
    loops = [layout.loop_steps(b) for b in range(layout.schedule_loops)]
    assert tuple(s for lp in loops for s in lp) == steps
    assert all([s.loop_end for s in lp] == [False] * (len(lp) - 1) + [True] for lp in loops)
    if layout.loopable:
        e, K = layout.edge, layout.block_size
        assert [s.position for s in steps if s.loop_end][:-1] == [e + (b + 1) * K - 1 for b in range(B - 1)]
        assert [s.position for s in steps if s.stage == PRELUDE] == list(range(e))
        assert [s.position for s in steps if s.stage == CODA] == list(range(L - e, L))
        for b in range(B):
            assert [s.position for s in loops[b] if s.stage == BLOCK] == layout.loop_positions(b)
    else:
        assert layout.schedule_loops == 1 and {s.stage for s in steps} == {BLOCK}


def _record_layers(model):
    calls = []
    inner = model.layer_forward

    def layer_forward(slot, position, *args, **kw):
        calls.append((slot, position if isinstance(position, int) else tuple(position.tolist())))
        return inner(slot, position, *args, **kw)

    model.layer_forward = layer_forward
    return calls


def _runner(model, max_seqs=2):
    a = model.arch
    cache = KVCache(a.num_layers, a.num_kv_heads, a.head_dim, 32, max_seqs, dtype=model.embed_tokens.weight.dtype)
    return ModelRunner(model, cache)


@pytest.mark.parametrize("family,strategy", [("llama", "cycle"), ("gemma3", "middle_cycle"), ("mistral", "sequence")])
def test_model_and_runner_run_the_same_schedule_and_loop_ends(family, strategy):
    model = convert(family, strategy=strategy, num_loops=3 if family == "llama" else 2)
    ids = [5, 17, 33, 2, 61, 8]
    with torch.no_grad():
        calls = _record_layers(model)
        ref = model(torch.tensor([ids]), output_loop_states=model.layout.loopable)
    schedule = [(s.slot, s.position) for s in model.layout.schedule()]
    assert calls == schedule

    runner, loop_ends = _runner(model), []
    calls.clear()
    row = Row("r", 0, 0, tuple(ids), 0, emits=True)
    for b in range(runner.num_loops):
        out = runner.execute_model(Batch((row,))).rows[0]
        assert out.done == (b == runner.num_loops - 1)
        loop_ends.append(out.hidden)
        row = Row("r", 0, 0, tuple(ids), b + 1, hidden=out.hidden, emits=True)
    assert calls == schedule  # a loop per step, the same steps in the same order
    torch.testing.assert_close(out.logits, ref.logits[0, -1].float())
    assert out.depth == runner.num_loops
    if model.layout.loopable:
        for b, h in enumerate(loop_ends[:-1]):
            torch.testing.assert_close(h, ref.loop_hidden_states[b][0])


def test_runner_rows_at_different_loops_match_each_row_alone():
    """One batch holding a row at loop 0 (prelude run) and a row at the last loop (coda run)."""
    model = convert("gemma3", strategy="middle_cycle", num_loops=2)
    a_ids, b_ids = (4, 9, 12, 40, 7), (30, 3, 77)

    def alone(ids, slot, upto):
        runner = _runner(model)
        row, outs = Row("x", slot, 0, ids, 0, emits=True), []
        for b in range(upto + 1):
            outs.append(runner.execute_model(Batch((row,))).rows[0])
            row = Row("x", slot, 0, ids, b + 1, hidden=outs[-1].hidden, emits=True)
        return outs

    a_outs, b_outs = alone(a_ids, 0, 1), alone(b_ids, 1, 0)
    # Row a's first loop alone, then its last loop batched with row b's first loop.
    runner = _runner(model)
    out = runner.execute_model(Batch((Row("a", 0, 0, a_ids, 0, emits=True),))).rows[0]
    row = Row("a", 0, 0, a_ids, 1, hidden=out.hidden, emits=True)
    kept = out.hidden.clone()
    mixed = runner.execute_model(Batch((row, Row("b", 1, 0, b_ids, 0, emits=True)))).rows
    assert mixed[0].done and not mixed[1].done
    torch.testing.assert_close(mixed[0].logits, a_outs[1].logits)
    torch.testing.assert_close(mixed[1].hidden, b_outs[0].hidden)
    # The runner changes no input: rows are frozen descriptions, outputs are new tensors.
    assert row.loop == 1 and torch.equal(row.hidden, kept)
