"""Configuration objects: the one source of truth for how a recursive model is laid out.

`RecursionConfig` says how to turn an L-layer model into a recursive one; `RecursiveConfig`
(a Hugging Face `PretrainedConfig`) carries it, together with the source model's own config,
inside every saved checkpoint so that the layout can be rebuilt without recursify's help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Union

from transformers import PretrainedConfig

STRATEGIES = ("cycle", "sequence", "middle_cycle", "middle_sequence")
INITS = ("stepwise", "average", "lower", "random", "calibrated")
LORA_INITS = ("svd", "zero")
VARIANTS = ("relaxed", "residual")

Rank = Union[int, Literal["full"]]


class ConfigError(ValueError):
    """A configuration that cannot describe a valid recursive model."""




@dataclass
class RecursionConfig:
    """How an L-layer model becomes K = L / num_loops unique layers looped num_loops times.

    `lora_rank` is 0 (plain recursive), a positive int, or "full" (min(d_in, d_out) per linear,
    which reproduces the source model exactly with SVD init). LoRA scale is exactly 1.
    `variant="residual"` is the ResidualTransformer: adjacent groups of `num_loops` layers share
    each weight (so it stores as many shared layers as the relaxed model), and every layer adds a
    low-rank term plus a learned diagonal. The diagonal is initialised to the diagonal of
    W_l - W_shared (zero with `lora_init="zero"`), the low-rank term from the SVD of what remains.
    """

    num_loops: int = 2
    strategy: str = "cycle"
    init: str = "stepwise"
    lora_rank: Rank = 0
    lora_init: str = "svd"
    lora_targets: list[str] | None = None  # None: every linear of attention and MLP
    variant: str = "relaxed"
    share_norms: bool = False
    seed: int = 0  # only used by init="random"
    calibration: dict | None = None  # set by convert(calibration=...): {"tokens": N, "damp": ...}
    rank_pattern: dict[str, int] | None = None  # per-linear ranks overriding lora_rank (as in PEFT)

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, str) and self.lora_rank.isdigit():
            self.lora_rank = int(self.lora_rank)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_loops, int) or self.num_loops < 1:
            raise ConfigError(f"num_loops must be a positive integer, got {self.num_loops!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.lora_init not in LORA_INITS:
            raise ConfigError(f"unknown lora_init {self.lora_init!r}; choose one of {', '.join(LORA_INITS)}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.lora_rank != "full" and (not isinstance(self.lora_rank, int) or self.lora_rank < 0):
            raise ConfigError(f"lora_rank must be 0, a positive integer or 'full', got {self.lora_rank!r}")
        for name, r in (self.rank_pattern or {}).items():
            if not isinstance(r, int) or r < 0:
                raise ConfigError(f"rank_pattern[{name!r}] must be a non-negative integer, got {r!r}")
        if self.variant == "residual" and self.strategy != "sequence":
            # Residual sharing is defined over adjacent layers, which is exactly the sequence map.
            self.strategy = "sequence"

    @property
    def middle(self) -> bool:
        return self.strategy.startswith("middle_")

    @property
    def looping(self) -> str:
        return "cycle" if self.strategy.endswith("cycle") else "sequence"

    @property
    def rank_text(self) -> str:
        """The uniform LoRA rank, or the per-linear ranks: 'q 320, k 192, ...'."""
        if self.rank_pattern:
            return ", ".join(f"{k} {v}" for k, v in self.rank_pattern.items())
        return str(self.lora_rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecursionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown RecursionConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)


PRELUDE, BLOCK, CODA = "prelude", "block", "coda"
STAGES = (PRELUDE, BLOCK, CODA)


class LayerStep(NamedTuple):
    """One unrolled position as an executor runs it (see `Layout.schedule`)."""

    position: int
    slot: int
    loop: int  # the loop it runs in: prelude in the first, coda in the last
    stage: str  # PRELUDE, BLOCK or CODA
    loop_end: bool  # its output is the residual stream at the end of `loop` (an exit point)


@dataclass(frozen=True)
class Layout:
    """Where each unrolled position of the recursive model takes its shared weights from.

    Positions 0..L-1 are the layers of the source model, in order. With a middle strategy the
    first and last positions keep unique slots (the prelude and the coda) and only the middle
    L-2 positions are shared. A "loop" is one pass over the shared block; for cycle strategies
    position(loop b, block index k) = prelude + b*K + k, which is what lets requests at
    different loops share one forward of the same weights.
    """

    num_layers: int
    num_loops: int
    strategy: str
    slot_of_position: tuple[int, ...] = field(default=())

    @classmethod
    def build(cls, num_layers: int, cfg: RecursionConfig) -> "Layout":
        L, B = num_layers, cfg.num_loops
        edge = 1 if cfg.middle else 0
        shared = L - 2 * edge
        if shared <= 0 or shared % B != 0:
            valid = [b for b in range(1, shared + 1) if shared > 0 and shared % b == 0]
            what = f"the {shared} middle layers" if cfg.middle else f"the {L} layers"
            raise ConfigError(
                f"num_loops={B} does not divide {what}; valid values: {', '.join(map(str, valid)) or 'none'}"
            )
        K = shared // B
        slots = []
        for p in range(L):
            if cfg.middle and p == 0:
                slots.append(0)
            elif cfg.middle and p == L - 1:
                slots.append(edge + K)
            else:
                i = p - edge
                k = i % K if cfg.looping == "cycle" else i // B
                slots.append(edge + k)
        return cls(num_layers=L, num_loops=B, strategy=cfg.strategy, slot_of_position=tuple(slots))

    @property
    def edge(self) -> int:
        return 1 if self.strategy.startswith("middle_") else 0

    @property
    def block_size(self) -> int:
        """K: number of shared layers in the looped block."""
        return (self.num_layers - 2 * self.edge) // self.num_loops

    @property
    def num_slots(self) -> int:
        return self.block_size + 2 * self.edge

    @property
    def loopable(self) -> bool:
        """Whether one loop is a contiguous pass over the block (needed for exits and depth batching)."""
        return self.strategy.endswith("cycle") or self.num_loops == 1

    @property
    def schedule_loops(self) -> int:
        """Loops an executor steps through: num_loops, or 1 when there is no loop boundary."""
        return self.num_loops if self.loopable else 1

    def schedule(self) -> tuple[LayerStep, ...]:
        """The order every executor runs the unrolled positions in: the model's forward walks it
        whole, the serving engine one loop per step (`loop_steps`), so both loop the same way.

        Without loop boundaries (sequence strategies) it is one loop of all positions in order.
        The last loop ends after the coda, so its loop end is the full model's output.
        """
        L, last = self.num_layers, self.schedule_loops - 1
        if not self.loopable:
            return tuple(LayerStep(p, s, 0, BLOCK, p == L - 1) for p, s in enumerate(self.slot_of_position))
        e, K = self.edge, self.block_size
        steps = []
        for p, slot in enumerate(self.slot_of_position):
            if p < e:
                steps.append(LayerStep(p, slot, 0, PRELUDE, False))
            elif p >= L - e:
                steps.append(LayerStep(p, slot, last, CODA, p == L - 1))
            else:
                b, k = divmod(p - e, K)
                steps.append(LayerStep(p, slot, b, BLOCK, k == K - 1 and (b < last or not e)))
        return tuple(steps)

    def loop_steps(self, loop: int) -> tuple[LayerStep, ...]:
        """What one pass of loop `loop` runs, prelude and coda included where they belong."""
        return tuple(st for st in self.schedule() if st.loop == loop)

    def positions_of_slot(self, slot: int) -> list[int]:
        return [p for p, s in enumerate(self.slot_of_position) if s == slot]

    def loop_positions(self, loop: int) -> list[int]:
        """Unrolled positions of the shared block at loop `loop` (cycle strategies only)."""
        if not self.loopable:
            raise ConfigError(f"strategy {self.strategy!r} has no loop boundaries; use a cycle strategy")
        K = self.block_size
        return [self.edge + loop * K + k for k in range(K)]


class RecursiveConfig(PretrainedConfig):
    """Hugging Face config of a recursive model: the source config plus the recursion layout."""

    model_type = "recursify"

    def __init__(self, base_config: dict | None = None, recursion: dict | None = None, family: str | None = None, **kwargs):
        self.base_config = dict(base_config or {})
        self.recursion = dict(recursion or {})
        self.family = family
        base = self.base_config
        # Surface what generation utilities look for; the unrolled depth stays num_hidden_layers so
        # that a Hugging Face cache gets one slot per unrolled position.
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "max_position_embeddings"):
            if key in base and key not in kwargs:
                kwargs[key] = base[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in base and key not in kwargs:
                kwargs[key] = base[key]
        kwargs.setdefault("tie_word_embeddings", base.get("tie_word_embeddings", False))
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    def recursion_config(self) -> RecursionConfig:
        return RecursionConfig.from_dict(self.recursion)
