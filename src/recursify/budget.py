"""The time budget `recursify compress` plans against: a clock that survives a resume, and what a
conversion costs in teacher forwards (the planner turns forwards into seconds with the forward
speed it measures on the machine)."""

from __future__ import annotations

import time


def convert_forwards(init: str) -> int:
    """A conversion's time in teacher forwards (measured on SmolLM2 / 2 cores): about 10k whatever
    the tokens, four times that with the joint calibrated shared-weight fit."""
    return 40_000 if init == "calibrated" else 10_000


def curvature_forwards(tokens: int, sequential: bool) -> int:
    """The output curvature's time in teacher forwards (measured the same way): about 4 a token for
    the backward passes, then one G^{1/2} per linear and position in the conversion and again in
    the sequential refit."""
    return 4 * tokens + 20_000 + (20_000 if sequential else 0)


class Clock:
    """Budget bookkeeping that survives a resume: seconds spent by earlier attempts are kept in
    the work folder's state file."""

    def __init__(self, budget: float, spent_before: float = 0.0):
        self.budget, self.before, self.t0 = budget, spent_before, time.monotonic()

    @property
    def spent(self) -> float:
        return self.before + time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.budget - self.spent
