"""What crosses between the scheduler and the runner in one step, as plain data.

As vLLM's SchedulerOutput / ModelRunnerOutput: the scheduler describes the step (`Batch`), the
runner computes and answers (`RunnerOutput`), and only the scheduler changes serving state
(`Scheduler.update_from_output`). The runner never sees a request or a work item, so it cannot
change one behind the scheduler's back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass(frozen=True)
class Row:
    """One sequence's tokens [start, start+length) running loop `loop` this step."""

    request_id: str
    seq_slot: int  # its KV-cache sequence slot
    start: int  # cache index of its first token
    token_ids: tuple[int, ...]  # embedded at loop 0
    loop: int
    hidden: torch.Tensor | None = None  # loop > 0: residual stream [length, d] entering the loop
    is_decode: bool = False  # a generated token fed back (only these may exit early)
    emits: bool = False  # finishing it yields the sequence's next token
    exit_after: int | None = None  # replay: the depth this token must exit at
    loop_argmax: tuple[int, ...] = ()  # oracle: the exit head's argmax at its earlier loop ends
    params: SamplingParams | None = None  # how to pick the token it emits (None: greedy)

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Batch:
    """The rows of one step, in the order the scheduler chose."""

    rows: tuple[Row, ...] = ()
    finished: tuple[str, ...] = ()  # requests ended since the last step: the runner drops their state

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(r.length for r in self.rows)


@dataclass(frozen=True)
class RowOutput:
    """What the step computed for one row."""

    done: bool  # its tokens are now cached at every depth (last loop run, or exited)
    exited: bool = False  # left before the last loop
    hidden: torch.Tensor | None = None  # not done: residual stream [length, d] at this loop end
    token: int | None = None  # emitted: the sampled next token (sampled on the device)
    logits: torch.Tensor | None = None  # emitted: its next-token logits [V], left on the device
    depth: int = 0  # emitted: loops the token ran (oracle: the first loop that already agreed)
    argmax: int | None = None  # oracle: the exit head's argmax at this loop end


@dataclass(frozen=True)
class RunnerOutput:
    """One `RowOutput` per row of the batch, in the same order."""

    rows: tuple[RowOutput, ...] = ()
