"""One engine step: a single batched pass over every row of a `Batch`, each row one loop deeper.

What a row at loop b runs is the layout's own schedule (`Layout.loop_steps(b)`), the one the
model's forward walks whole: the prelude at loop 0, the shared block, the coda at the last loop.
Rows are run stage by stage, column by column: the j-th block step of every loop is one shared
slot in a cycle layout, so `model.layer_forward(slot, positions, h, rope, attend)` serves all rows
at once with per-row unrolled positions (each row gathers its own LoRA and norms); prelude and
coda steps run on the rows that have them.

At a loop boundary a decode row may exit, as the exit policy (exit_policy.py) decides: from the
shared head's logits (confidence, entropy) or from its residual stream alone (saturation, or the
learned probe of exit_classifier.py, which follows the model's device and dtype). The
keys/values of the depths it skipped are still needed by later tokens, so they are filled from
the exit hidden state (CALM's state propagation) with the model's `kv_projection`, batched per
shared slot, in the same step.

Rows are grouped by length: single tokens in one group, prefill chunks (padded to the longest)
in another, so a long chunk never pads every decode row to its length.

The runner owns the cache tensors and nothing else: it reads the rows and returns a
`RunnerOutput`; the scheduler turns that into state. Every tensor a step builds is made on the
model's device from the rows' Python ints (per-row positions travel as `RowPositions`: host ints
that choose the adapters, a device copy that gathers them), so a step never reads a device tensor
back to decide what to run. Tokens are sampled here, on the device (`sampling.sample_tokens`), and
come back as ids in one transfer per step; a step that offers exits reads their decisions back
once more (one boolean per offered row). `tests/test_engine.py` counts these transfers.
"""

from __future__ import annotations

import time

import torch

from ..config import BLOCK, CODA, PRELUDE, STAGES
from ..util.positions import RowPositions
from .batch import Batch, Row, RowOutput, RunnerOutput
from .exit_policy import ExitConfig, ExitPolicy
from .kv_cache import KVCache
from .request import SamplingParams
from .sampling import make_generator, sample_tokens

GREEDY = SamplingParams(max_tokens=1)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    """A LongTensor of host ints, made on `device` (one host-to-device copy)."""
    return torch.tensor(values, dtype=torch.long, device=device)


class _Group:
    """Rows of one forward call: residual streams, RoPE, per-row sequence slot and first cache
    index, the valid (row, token) pairs and the model's causal masks over the cached keys."""

    def __init__(self, rows: list[Row], h: torch.Tensor, rope: dict, masks: dict | None = None):
        self.rows, self.h, self.rope = rows, h, rope
        device = h.device
        self.slots = _long([r.seq_slot for r in rows], device)
        self.starts = _long([r.start for r in rows], device)
        self.valid_rows = _long([i for i, r in enumerate(rows) for _ in range(r.length)], device)
        self.valid_t = _long([t for r in rows for t in range(r.length)], device)
        self.S = max(r.start + r.length for r in rows)
        self.masks = masks
        self.previous = None

    def subset(self, rows: list[int]) -> "_Group":
        idx = _long(rows, self.h.device)
        rope = {key: (c[idx], s[idx]) for key, (c, s) in self.rope.items()}
        g = _Group([self.rows[i] for i in rows], self.h[idx], rope, {key: m[idx] for key, m in self.masks.items()})
        g.S = self.S
        return g


class ModelRunner:
    """`exit_classifier` (an ExitClassifier) is read in exit mode classifier only; it is checked
    against the model and moved to the model's device and dtype."""

    def __init__(self, model, cache: KVCache, exit_config: ExitConfig | None = None, exit_classifier=None):
        self.model = model
        self.cache = cache
        self.exit = exit_config or ExitConfig()
        layout = model.layout
        self.num_loops = layout.schedule_loops
        self.note = None
        if not layout.loopable:
            # No loop boundary to batch or exit at: every step runs all positions (plain
            # continuous batching over the unrolled model).
            self.note = (
                f"strategy {layout.strategy!r} has no loop boundaries: depth-wise batching and early exit are off, "
                "every step runs all positions"
            )
            if self.exit.checks:
                self.exit = ExitConfig("none")
        # plan[b][stage]: the steps a row at loop b runs in that stage, from the layout's schedule.
        self.plan = [{stage: [st for st in layout.loop_steps(b) if st.stage == stage] for stage in STAGES}
                     for b in range(self.num_loops)]
        # skipped[b]: the steps a token exiting after loop b never runs (their k/v are filled).
        self.skipped = [[st for c in range(b + 1, self.num_loops) for st in layout.loop_steps(c)]
                        for b in range(self.num_loops)]
        for stage in STAGES:  # rows at different loops share a column only through one shared slot
            width = max(len(p[stage]) for p in self.plan)
            for j in range(width):
                if len({p[stage][j].slot for p in self.plan if j < len(p[stage])}) > 1:
                    raise ValueError(f"layout {layout.strategy!r}: loops disagree on the slot of {stage} step {j}")
        if self.exit.mode == "classifier" and self.num_loops < 2:
            self.exit = ExitConfig("none")  # one loop: no boundary for a probe to read
        classifier = exit_classifier.bind(model) if self.exit.mode == "classifier" and exit_classifier else None
        self.policy = ExitPolicy(self.exit, classifier, model.final_norm)
        self.exit = self.policy.config  # the threshold in use (classifier: the calibrated one by default)
        self.measure = False  # synchronize a GPU around exit decisions so their timing is exact
        self.exit_seconds = 0.0  # time spent deciding exits (head included for head modes)
        self.exit_checks = 0  # rows offered an exit
        self.device = model.embed_tokens.weight.device
        self.generators: dict[str, torch.Generator] = {}  # per sampling request, on the device
        if cache.k.device != self.device:
            raise ValueError(f"the KV cache is on {cache.k.device} but the model is on {self.device}")

    # ------------------------------------------------------------------ assembly
    def _group(self, rows: list[Row]) -> _Group:
        n, T = len(rows), max(r.length for r in rows)
        model, device = self.model, self.device
        h = torch.zeros(n, T, model.arch.hidden_size, dtype=model.embed_tokens.weight.dtype, device=device)
        fresh = [i for i, r in enumerate(rows) if r.loop == 0]
        if fresh:
            ids = _long([list(rows[i].token_ids) + [0] * (T - rows[i].length) for i in fresh], device)
            h[_long(fresh, device)] = model.embed(ids)
        for i, r in enumerate(rows):
            if r.loop > 0:
                h[i, : r.length] = r.hidden
        starts = _long([r.start for r in rows], device)
        rope = model.rope(h, starts.view(n, 1) + torch.arange(T, device=device).view(1, T))
        g = _Group(rows, h, rope)
        g.masks = model.build_masks(None, n, T, starts, device, total=g.S)
        return g

    def _attend(self, g: _Group):
        cache, model = self.cache, self.model

        def attend(q, k, v, position, is_sliding):
            if isinstance(position, int):
                pos = torch.full((k.shape[0],), position, dtype=torch.long, device=k.device)
            else:
                pos = position.index
            rr, tt = g.valid_rows, g.valid_t
            cache.write(g.slots[rr], pos[rr], g.starts[rr] + tt, k[rr, :, tt], v[rr, :, tt])
            keys, values = cache.read(g.slots, pos, g.S)
            if isinstance(is_sliding, bool):
                mask = g.masks[is_sliding]
            else:
                mask = torch.where(is_sliding.view(-1, 1, 1, 1), g.masks[True], g.masks[False])
            return model.attention_scores(q, keys, values, mask)

        return attend

    def _layer(self, g: _Group, steps) -> None:
        """One layer on every row of g; the steps (one per row) share one slot (checked at init)."""
        positions = [st.position for st in steps]
        pos = positions[0] if all(p == positions[0] for p in positions) else RowPositions.make(positions, g.h.device)
        g.h = self.model.layer_forward(steps[0].slot, pos, g.h, g.rope, self._attend(g))

    def _run_stage(self, g: _Group, stage: str) -> None:
        """Column j of `stage` on the rows whose loop has a j-th step there."""
        plans = [self.plan[r.loop][stage] for r in g.rows]
        for j in range(max(len(p) for p in plans)):
            rows = [i for i, p in enumerate(plans) if j < len(p)]
            steps = [plans[i][j] for i in rows]
            if len(rows) == len(g.rows):
                self._layer(g, steps)
                continue
            sub = g.subset(rows)
            self._layer(sub, steps)
            g.h = g.h.index_copy(0, _long(rows, g.h.device), sub.h)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(self, batch: Batch) -> RunnerOutput:
        """Advance every row by one loop; what each row produced, in batch order. Writes the KV
        cache, changes nothing else."""
        outputs: list[RowOutput | None] = [None] * len(batch.rows)
        for request_id in batch.finished:
            self.generators.pop(request_id, None)
        for part in ([i for i, r in enumerate(batch.rows) if r.length == 1],
                     [i for i, r in enumerate(batch.rows) if r.length > 1]):
            if not part:
                continue
            g = self._group([batch.rows[i] for i in part])
            self._run_stage(g, PRELUDE)
            if self.policy.needs_previous:  # each row's state entering this loop: the previous loop end
                g.previous = g.h[_long(list(range(len(g.rows))), g.h.device), self._last_t(g.rows)]
            self._run_stage(g, BLOCK)
            self._run_stage(g, CODA)
            for i, out in zip(part, self._outputs(g)):
                outputs[i] = out
        return RunnerOutput(tuple(outputs))

    def _outputs(self, g: _Group) -> list[RowOutput]:
        last = self.num_loops - 1
        final = [i for i, r in enumerate(g.rows) if r.loop == last and r.emits]
        offered = [i for i, r in enumerate(g.rows) if r.loop < last and r.is_decode and self.exit.checks]
        exited, logits, argmax = self._decide(g, offered)
        emit, tokens, finals = sorted(final + exited), {}, {}
        if emit:
            missing = [i for i in emit if i not in logits]
            if missing:
                rows = _long(missing, g.h.device)
                logits.update(zip(missing, self.model.exit_logits(g.h[rows, self._last_t(g.rows, missing)])))
            stacked = torch.stack([logits[i] for i in emit])
            sampled = self._sample([g.rows[i] for i in emit], stacked)
            if self.policy.mode == "oracle":  # the full-depth argmax, for the recorded depth
                sampled = torch.stack([sampled, stacked.argmax(dim=-1)])
            # The step's one device-to-host copy: the sampled ids (and oracle's argmax), never logits.
            host = sampled.tolist()
            tokens = dict(zip(emit, host[0] if self.policy.mode == "oracle" else host))
            finals = dict(zip(emit, host[1])) if self.policy.mode == "oracle" else {}
        if exited:
            self._propagate(g, exited)
        out, gone = [], set(exited)
        for i, r in enumerate(g.rows):
            done, token = r.loop == last or i in gone, tokens.get(i)
            depth = 0
            if token is not None:
                depth = r.loop + 1 if i in gone else self.policy.final_depth(r, finals.get(i, token), self.num_loops)
            out.append(RowOutput(done, i in gone, hidden=None if done else g.h[i, : r.length], token=token,
                                 logits=logits.get(i), depth=depth, argmax=argmax.get(i)))
        return out

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Token ids [n] on the device for the emitting rows' logits [n, V]."""
        params = [r.params or GREEDY for r in rows]
        generators = []
        for r, p in zip(rows, params):
            gen = None
            if not p.is_greedy:
                gen = self.generators.get(r.request_id)
                if gen is None:
                    gen = self.generators[r.request_id] = make_generator(p, logits.device)
            generators.append(gen)
        return sample_tokens(logits, params, generators)

    def _last_t(self, rows: list[Row], which=None) -> torch.Tensor:
        """Index of each row's last valid token (padding follows it), on the model's device."""
        which = range(len(rows)) if which is None else which
        return _long([rows[i].length - 1 for i in which], self.device)

    def _decide(self, g: _Group, offered: list[int]) -> tuple[list[int], dict, dict]:
        """Rows (of `offered`) that exit now, the exit logits the decision already computed (on
        the device), and oracle's argmax per offered row. Timed into `exit_seconds` /
        `exit_checks` (the policy's cost)."""
        if not offered:
            return [], {}, {}
        if self.measure and g.h.device.type == "cuda":
            torch.cuda.synchronize(g.h.device)
        t0 = time.perf_counter()
        rows = _long(offered, g.h.device)
        hidden = g.h[rows, self._last_t(g.rows, offered)]
        previous = g.previous[rows] if self.policy.needs_previous else None
        logits = self.model.exit_logits(hidden) if self.policy.uses_head else None
        picked = [g.rows[i] for i in offered]
        decisions, argmax = self.policy.decisions([r.loop for r in picked], [r.exit_after for r in picked],
                                                  hidden, previous, logits)
        self.exit_seconds += time.perf_counter() - t0
        self.exit_checks += len(offered)
        exited = [i for i, d in zip(offered, decisions) if d]
        argmax = dict(zip(offered, argmax)) if argmax is not None else {}
        if logits is None:
            return exited, {}, argmax
        return exited, {i: logits[j] for j, i in enumerate(offered) if decisions[j]}, argmax

    def _propagate(self, g: _Group, rows: list[int]) -> None:
        """Fill the KV entries of the steps each exited row skipped, from its exit state."""
        by_slot: dict[int, tuple[list[int], list[int]]] = {}
        for i in rows:
            for st in self.skipped[g.rows[i].loop]:
                rs, ps = by_slot.setdefault(st.slot, ([], []))
                rs.append(i)
                ps.append(st.position)
        for slot, (rs, ps) in by_slot.items():
            r, p = _long(rs, g.h.device), RowPositions.make(ps, g.h.device)
            rope = {key: (c[r], s[r]) for key, (c, s) in g.rope.items()}
            k, v = self.model.kv_projection(slot, p, g.h[r, :1], rope)
            self.cache.write(g.slots[r], p.index, g.starts[r], k[:, :, 0], v[:, :, 0])
