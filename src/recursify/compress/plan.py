"""The time planner of `recursify compress`: which work fits the budget. Pure: no model, no file,
no clock. Its inputs are the request (`CompressConfig`), what this machine measured (`Costs`: the
teacher's forward speed, from which every other cost follows), the seconds left, and what data is
there (`Available`: calibration tokens, cached statistics, layout candidates, all plain numbers);
its outputs are frozen decisions and the lines the user reads about them.

Work is counted in teacher forwards (measured on SmolLM2 / 2 cores) and turned into seconds with the
measured speed: statistics 4 a calibration token (nothing when cached), the sequential refit 12 a
token of its 8192, the output curvature `curvature_forwards`, a conversion `convert_forwards`, a KD
step 5 a training token. A short budget gives up, in this order, the layout search, then the output
curvature (that one first when there is no search), then calibration tokens (halved down to 2048),
then the calibrated shared-weight fit (for average init), then the sequential refit, before refusing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FIT_TOKENS, MIN_CALIB_TOKENS, SEARCH_TOKENS, CompressConfig, CompressError, fmt_seconds


def convert_forwards(init: str, scale: float = 1.0) -> float:
    """A conversion's time in teacher forwards (measured on SmolLM2 / 2 cores): about 10k whatever
    the tokens, four times that with the joint calibrated shared-weight fit; times `scale`
    (`conversion_scale`) for another model."""
    return (40_000 if init == "calibrated" else 10_000) * scale


def curvature_forwards(tokens: int, sequential: bool) -> int:
    """The output curvature's time in teacher forwards (measured the same way): about 4 a token for
    the backward passes, then one G^{1/2} per linear and position in the conversion and again in
    the sequential refit."""
    return 4 * tokens + 20_000 + (20_000 if sequential else 0)


def _decomposition_per_forward(arch, family) -> float:
    """A conversion's decompositions (an eigendecomposition of min(d_in, d_out) per linear and
    position: cubic) per multiply-add of one token's forward (quadratic)."""
    shapes = [arch.linear_shape(n) for n in family.linears]
    cubic = arch.num_layers * sum(min(d_in, d_out) ** 3 for d_in, d_out in shapes)
    macs = arch.num_layers * sum(d_in * d_out for d_in, d_out in shapes) + arch.hidden_size * arch.vocab_size
    return cubic / macs


# SmolLM2-135M's ratio (30 layers of 576 / 1536, vocabulary 49152), which `convert_forwards` was measured on
_SMOLLM2_RATIO = 30 * (5 * 576**3 + 2 * 192**3) / (30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152)


def conversion_scale(arch, family) -> float:
    """How many times SmolLM2's conversion time, in its own forwards, a model's conversion takes:
    eigendecompositions grow with the cube of the width, a forward with its square (a 1B model
    of TinyLlama's shape: about 4x)."""
    return _decomposition_per_forward(arch, family) / _SMOLLM2_RATIO


@dataclass(frozen=True)
class Costs:
    """What this machine measured, the planner's one link to the hardware."""

    fwd_tok_s: float  # the teacher's forward tokens/s (timed on the held-out perplexity)
    eval_tokens: int  # held-out tokens the final evaluation reads
    scale: float = 1.0  # `conversion_scale` of the model


def reserve_seconds(cfg: CompressConfig, costs: Costs) -> float:
    """Kept for the end: the final evaluation, generations (~150 decode steps) and saving."""
    return (6 * costs.eval_tokens + 3000) / costs.fwd_tok_s + 5


def step_seconds(cfg: CompressConfig, costs: Costs) -> float:
    """A KD step costs about five forwards of its tokens."""
    return 5 * cfg.batch_size * cfg.seq_len / costs.fwd_tok_s


def room_steps(cfg: CompressConfig) -> int:
    """The KD steps the preparation leaves room for: ten, or all that `--max-tokens` allows when
    that is fewer (the time those would not use goes to the conversion)."""
    return min(10, max(1, cfg.max_tokens // (cfg.batch_size * cfg.seq_len))) if cfg.max_tokens else 10


@dataclass(frozen=True)
class Available:
    """What data the preparation can use, as plain numbers."""

    calib_tokens: int  # training text calibration may draw on, in whole sequences (all of it, or what it asks for)
    cached: frozenset[int] = frozenset()  # calibration token counts whose statistics are already cached
    layouts: int = 0  # --loops auto: the candidate layouts a search converts
    fallback: tuple[int, str] | None = None  # --loops auto: (loops, rank) taken without the search


@dataclass(frozen=True)
class Preparation:
    """What the conversion does: statistics on the training text's first `calib_rows` sequences, the
    search (if kept) scored on rows `probe` [start, stop), and the fits kept."""

    calib_tokens: int  # the calibration budget after halving (cfg.calib_tokens when it fits)
    calib_rows: int
    probe: tuple[int, int] | None
    search: bool
    curvature: bool
    init: str
    sequential: bool
    seconds: float  # estimated: statistics, conversion, search
    refit_seconds: float  # estimated: sequential refit and output curvature
    lines: tuple[str, ...] = ()  # what was given up, for the user


class BudgetError(CompressError):
    """The budget cannot fit calibration and one training step; `lines`: what was given up first."""

    def __init__(self, message: str, lines: tuple[str, ...] = ()):
        super().__init__(message)
        self.lines = lines


def _split(cfg: CompressConfig, available: int, calib_tokens: int,
           searching: bool) -> tuple[int, tuple[int, int] | None]:
    """(statistics rows, the search's scoring rows) for a calibration budget. The layouts are scored
    on text held out of the statistics: scored on the text they were fitted to, high ranks look best
    however little calibration text there is. Short text: halves."""
    s, n_probe = cfg.seq_len, max(1, SEARCH_TOKENS // cfg.seq_len)
    total = min(available // s, (calib_tokens + (SEARCH_TOKENS if searching else 0)) // s)
    if not searching:
        return total, None
    beyond = total - calib_tokens // s  # rows past the calibration text
    held = min(n_probe, beyond) if beyond > 0 else total // 2
    return (total - held, (total - held, total)) if held else (total, (max(0, total - n_probe), total))


def calibration_sizes(cfg: CompressConfig, available: int) -> tuple[int, ...]:
    """Every calibration token count `plan_preparation` may weigh (with the search, then without it
    and halving): the executor looks up which have cached statistics (`Available.cached`)."""
    rows = [_split(cfg, available, cfg.calib_tokens, True)[0]] if cfg.loops == "auto" else []
    c = cfg.calib_tokens
    while True:
        rows.append(_split(cfg, available, c, False)[0])
        if c <= MIN_CALIB_TOKENS:
            return tuple(dict.fromkeys(n * cfg.seq_len for n in rows if n))
        c = max(MIN_CALIB_TOKENS, c // 2)


def plan_preparation(cfg: CompressConfig, costs: Costs, seconds_left: float, available: Available, *,
                     curvature: bool = True, sequential: bool = True) -> Preparation:
    """Fit the preparation to `seconds_left`, keeping room for the final evaluation and ten KD steps
    (`room_steps`).
    `curvature` / `sequential` False: already given up (by the memory plan, or an earlier attempt)."""
    fwd, scale = costs.fwd_tok_s, costs.scale
    reserve, steps_s = reserve_seconds(cfg, costs), room_steps(cfg) * step_seconds(cfg, costs)
    calib_tokens, searching, init = cfg.calib_tokens, cfg.loops == "auto", cfg.init
    curvature, sequential = cfg.curvature and curvature, cfg.sequential and sequential
    lines: list[str] = []
    while True:
        rows, probe = _split(cfg, available.calib_tokens, calib_tokens, searching)
        if rows < 1:  # calib_tokens < seq_len
            raise CompressError(f"calibration needs at least one sequence: {calib_tokens} calibration tokens < "
                                f"seq_len={cfg.seq_len}")
        tokens = rows * cfg.seq_len
        convert_s = convert_forwards(init, scale) / fwd
        search_s = available.layouts * convert_forwards(cfg.search_init, scale) / fwd if searching else 0
        prep = (0 if tokens in available.cached else 4 * tokens / fwd) + convert_s + search_s
        refit = 12 * min(FIT_TOKENS, tokens) / fwd if sequential else 0
        refit += curvature_forwards(min(FIT_TOKENS, tokens), sequential) / fwd if curvature else 0
        if (seconds_left >= prep + refit + reserve + steps_s
                or not (searching or curvature or calib_tokens > MIN_CALIB_TOKENS)):
            break
        if curvature and not searching:  # the most expensive part per unit of gain
            lines.append("      the budget is too short for the output curvature; fitting input-side only "
                         "(raise --time-budget to keep it)")
            curvature = False
        elif searching:
            loops, rank = available.fallback
            lines.append(f"      the budget is too short to compare {available.layouts} layouts; using {loops} loops "
                         f"at rank {rank} (raise --time-budget to let it choose)")
            searching = False
        else:
            calib_tokens = max(MIN_CALIB_TOKENS, calib_tokens // 2)
    if calib_tokens < cfg.calib_tokens:
        lines.append(f"      calibrating on {calib_tokens} tokens instead of {cfg.calib_tokens} to fit the budget")
    if init == "calibrated" and seconds_left < prep + refit + reserve + steps_s:
        lines.append("      the budget is too short for the calibrated shared-weight fit; using average init "
                     "(raise --time-budget to keep it)")
        prep -= (convert_forwards(init, scale) - convert_forwards("average", scale)) / fwd
        init = "average"
    if sequential and seconds_left < prep + refit + reserve + steps_s:
        lines.append("      the budget is too short for the sequential refit; skipping it "
                     "(raise --time-budget to keep it)")
        sequential = False
    if seconds_left < prep + reserve + step_seconds(cfg, costs):
        raise BudgetError(f"the time budget ({fmt_seconds(cfg.time_budget)}) cannot fit calibration (about "
                          f"{fmt_seconds(prep)} here) and one training step; raise --time-budget", tuple(lines))
    return Preparation(calib_tokens=calib_tokens, calib_rows=rows, probe=probe, search=searching, curvature=curvature,
                       init=init, sequential=sequential, seconds=prep, refit_seconds=refit, lines=tuple(lines))


@dataclass(frozen=True)
class Distillation:
    """One run of the trainer: `seconds` and `max_tokens` at most, its warm-up and save cadence."""

    seconds: float
    max_tokens: int
    warmup_steps: int
    save_every: int


def distillation(cfg: CompressConfig, costs: Costs, seconds: float, max_tokens: int) -> Distillation:
    """Warm-up and checkpoints a tenth of the steps it can take (the fewer of the time's and of
    `max_tokens`'), so a fixed amount of work gets the same schedule on any machine; at least 5
    warm-up steps: Adam's first steps move every weight by about the full rate."""
    steps = max(1, min(int(seconds / step_seconds(cfg, costs)), max_tokens // (cfg.batch_size * cfg.seq_len)))
    return Distillation(seconds=seconds, max_tokens=max_tokens, warmup_steps=min(20, max(5, steps // 10)),
                        save_every=max(10, steps // 10))


def plan_distillation(cfg: CompressConfig, costs: Costs, seconds_left: float,
                      max_tokens: int | None = None) -> Distillation:
    """KD for the time left less the reserve; `max_tokens`: an earlier attempt's (a resumed run keeps
    it), else cfg.max_tokens, else the tokens of twice the steps the time can pay for."""
    train_time, step_s = seconds_left - reserve_seconds(cfg, costs), step_seconds(cfg, costs)
    if train_time < step_s:
        raise CompressError(f"the time budget leaves {max(0, train_time):.0f} s for training, less than one step "
                            f"(about {step_s:.0f} s here); raise --time-budget")
    if max_tokens is None:
        per_step = cfg.batch_size * cfg.seq_len
        max_tokens = cfg.max_tokens or max(per_step, int(2 * train_time / step_s) * per_step)
    return distillation(cfg, costs, train_time, max_tokens)


def local_seconds(cfg: CompressConfig, costs: Costs, seconds_left: float) -> float:
    """The local distillation's share of the time left less the reserve."""
    return cfg.local_fraction * (seconds_left - reserve_seconds(cfg, costs))


__all__ = ["Available", "BudgetError", "Costs", "Distillation", "Preparation", "calibration_sizes",
           "conversion_scale", "convert_forwards", "curvature_forwards", "distillation", "local_seconds",
           "plan_distillation", "plan_preparation", "reserve_seconds", "room_steps", "step_seconds"]
