"""Exit policies: when a decode token may leave the shared block before the last loop.

A policy turns the rows at a loop boundary into exit decisions. The scores are batched tensor
functions on the model's device (one host transfer of booleans per decision), so their cost per
step can be measured and compared:

  confidence  max softmax probability of the exit head's logits >= threshold
  entropy     1 - H(p) / log(V) of the exit head's distribution >= threshold
  saturation  cosine similarity of the last position's residual stream at this loop end and at
              the previous one (the loop's input for the first loop) >= threshold; it reads no
              head, so a row that stays pays nothing but a dot product
  classifier  a learned probe per loop boundary (exit_classifier.py, CALM) on the final-normed
              residual stream: P(exit argmax == full-depth argmax) >= threshold; no head either,
              and the threshold defaults to the one calibrated with the probe
  oracle      never exits; records each loop's argmax so the final depth is the first loop that
              already agreed with full depth (the paper's upper bound)
  replay      exits at the depths in each request's `exit_schedule` (e.g. an oracle pass's)

`resolve_exit` is the one defaulting rule (a threshold alone means confidence exit, a mode alone
threshold 0.9, classifier alone its calibrated threshold) shared by the engine, the server and the
benchmark; `ExitConfig` applies the same default when built directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .exit_classifier import FIT_HINT
from .request import ParamError

EXIT_MODES = ("none", "confidence", "entropy", "saturation", "oracle", "replay", "classifier")
HEAD_MODES = ("confidence", "entropy", "oracle")  # the decision reads the exit head's logits
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class ExitConfig:
    """An exit mode (see the module docstring) and its threshold in (0, 1]. No threshold means
    0.9, except for classifier: None there stands for the threshold calibrated and saved with the probe."""

    mode: str = "none"
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in EXIT_MODES:
            raise ParamError(f"unknown exit mode {self.mode!r}; choose one of {', '.join(EXIT_MODES)}", "exit_mode")
        if self.threshold is None and self.mode != "classifier":
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)
        t = self.threshold
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ParamError(f"exit threshold must be a number in (0, 1], got {t!r}", "exit_threshold")

    @property
    def uses_head(self) -> bool:
        return self.mode in HEAD_MODES

    @property
    def checks(self) -> bool:
        """Whether rows before the last loop are offered an exit at all."""
        return self.mode != "none"


def resolve_exit(exit: ExitConfig | str | None = None, threshold: float | None = None) -> ExitConfig:
    """ExitConfig from the user-facing pair (mode or config, threshold); raises ParamError, one line."""
    if isinstance(exit, ExitConfig):
        if threshold is not None and exit.threshold is None:  # classifier's calibrated default, overridden
            return ExitConfig(exit.mode, threshold)
        if threshold is not None and threshold != exit.threshold:
            raise ParamError(f"exit threshold given twice: {threshold} and {exit.threshold} in the ExitConfig",
                             "exit_threshold")
        return exit
    mode = exit or ("confidence" if threshold is not None else "none")
    return ExitConfig(mode, threshold)


# ---------------------------------------------------------------------------- scores
def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[n, V] logits -> [n] largest probability (computed in float32)."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """[n, V] logits -> [n] 1 - H(p)/log(V): 1 for a one-hot distribution, 0 for a uniform one."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


def saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[n, d] residual streams at this loop end and the previous one -> [n] cosine similarity."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1, eps=1e-12)


SCORES = {"confidence": max_softmax, "entropy": entropy_confidence}


def forced_depth(request) -> int | None:
    """Replay: the depth the request's next token must exit at, if its schedule says one."""
    schedule = request.exit_schedule or []
    n = len(request.output_token_ids)
    return schedule[n] if n < len(schedule) else None


class ExitPolicy:
    """Decides which candidate rows exit, from their loops, their last-position residual streams
    now and at the previous loop end, and (for head modes) their exit logits. `decisions` is pure
    (the runner's; oracle's argmax is returned for the scheduler to record), `decide` the same on
    work items, recording oracle's argmax on them.

    Mode classifier needs `classifier` (an `ExitClassifier` on the states' device) and `norm`, the
    model's final norm its probes were fitted after; `config.threshold` None becomes the
    classifier's calibrated threshold, so `self.config` always holds the threshold in use."""

    def __init__(self, config: ExitConfig, classifier=None, norm=None):
        if config.mode == "classifier":
            if classifier is None:
                raise ParamError(f"exit mode 'classifier' needs an exit classifier; {FIT_HINT}", "exit_mode")
            threshold = classifier.threshold if config.threshold is None else config.threshold
            if threshold is None:
                raise ParamError("the exit classifier has no calibrated threshold (no exit_classifier.json); pass an "
                                 f"exit threshold or refit it: {FIT_HINT}", "exit_threshold")
            config = ExitConfig("classifier", threshold)
        self.config = config
        self.mode = config.mode
        self.classifier = classifier if config.mode == "classifier" else None
        self.norm = norm if norm is not None else (lambda h: h)

    @property
    def uses_head(self) -> bool:
        return self.config.uses_head

    @property
    def needs_previous(self) -> bool:
        return self.mode == "saturation"

    def scores(self, hidden, previous, logits, loops=None) -> torch.Tensor:
        if self.mode == "saturation":
            return saturation(hidden, previous)
        if self.mode == "classifier":  # one dot product per row, on the final-normed state
            return self.classifier(self.norm(hidden), loops)
        return SCORES[self.mode](logits)

    def decisions(self, loops: list[int], exit_after: list[int | None], hidden: torch.Tensor | None,
                  previous: torch.Tensor | None, logits: torch.Tensor | None) -> tuple[list[bool], list[int] | None]:
        """(exit or not per row, oracle's exit-head argmax per row or None); changes nothing.
        `exit_after` is each row's replayed depth (`forced_depth`), read in replay mode only."""
        n = len(loops)
        if self.mode == "oracle":
            return [False] * n, logits.argmax(dim=-1).tolist()
        if self.mode == "replay":
            return [a is not None and b + 1 >= a for b, a in zip(loops, exit_after)], None
        if self.mode == "none":
            return [False] * n, None
        return (self.scores(hidden, previous, logits, loops) >= self.config.threshold).tolist(), None

    def final_depth(self, item, final: int, num_loops: int) -> int:
        """Depth recorded for a token that ran every loop (oracle: the first loop whose argmax
        agreed with `final`, the full-depth argmax); `item` is anything with the `loop_argmax` of
        its earlier loops (a work item or a row)."""
        if self.mode == "oracle":
            for b, a in enumerate(item.loop_argmax):
                if a == final:
                    return b + 1
        return num_loops
