"""Requests and their sampling parameters: what a client asks for, validated once at the door.

Validation raises `ParamError` (a ValueError naming the offending parameter) so that the HTTP
server can answer 400 with OpenAI's `param` field filled in, and library users get one clear line.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


class ParamError(ValueError):
    """An invalid request parameter; `param` names it (as in OpenAI's error body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to pick each token. temperature=0 (the default) or greedy=True means argmax.

    top_k=0 and top_p=1 switch those filters off. `seed` makes sampling reproducible per request,
    independent of what else is in the batch. `stop` strings end the completion and are not
    included in the text. `ignore_eos` keeps generating past the end-of-sequence token
    (benchmarks use it for fixed-length outputs).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ParamError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise ParamError(f"temperature must be a number in [0, 2], got {self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ParamError(f"top_p must be a number in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ParamError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}", "top_k")
        if self.seed is not None and not _is_int(self.seed):
            raise ParamError(f"seed must be an integer, got {self.seed!r}", "seed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop must be a non-empty string or a list of non-empty strings", "stop")
        if len(self.stop) > 16:
            raise ParamError("at most 16 stop strings are supported", "stop")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Request:
    """One sequence from arrival to completion, and its serving timeline.

    `exit_depths[i]` is the number of loops that generated token i went through (1..num_loops);
    `exit_schedule`, when given, forces token i to exit after that many loops (used to replay
    oracle exits measured in a full-depth pass; see runner.ExitConfig).
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    exit_schedule: list[int] | None = None

    output_token_ids: list[int] = field(default_factory=list)
    exit_depths: list[int] = field(default_factory=list)
    text: str = ""
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    first_token_time: float | None = None
    finish_time: float | None = None
    # Serving state, owned by the scheduler (the runner never sees a Request).
    seq_slot: int | None = None
    num_computed: int = 0  # tokens whose keys/values are in the cache at every depth
    work: Any = None  # the WorkItem in flight (scheduler.WorkItem)
    _sent_text: int = 0  # characters already handed out as stream deltas
    _sent_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        if not self.prompt_token_ids:
            raise ParamError("prompt must not be empty", "prompt")

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic()

    # ------------------------------------------------------------------ text
    def update_text(self, tokenizer) -> bool:
        """Re-detokenise the output; return True if a stop string ended it.

        Decoding the whole output each time is quadratic but exact for any tokenizer (byte-level
        BPE pieces only become characters in context), and outputs here are short.
        """
        if tokenizer is None:
            return False
        text = tokenizer.decode(self.output_token_ids, skip_special_tokens=True)
        for s in self.params.stop:
            # Only look where the new token could have completed a stop string.
            i = text.find(s, max(0, self._sent_text - len(s)))
            if i >= 0:
                self.text = text[:i]
                return True
        self.text = text
        return False

    def stream_delta(self, final: bool) -> tuple[str, list[int]]:
        """New text and token ids since the last call.

        Text that may still change is held back: a trailing replacement character (an incomplete
        UTF-8 sequence) and a tail that could be the start of a stop string.
        """
        text = self.text
        if not final:
            end = len(text.rstrip("\ufffd"))
            hold = 0
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if text.endswith(s[:n], 0, end):
                        hold = max(hold, n)
                        break
            text = text[: max(end - hold, self._sent_text)]
        delta = text[self._sent_text:]
        self._sent_text = len(text)
        tokens = self.output_token_ids[self._sent_tokens:]
        self._sent_tokens = len(self.output_token_ids)
        return delta, tokens


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the deltas and the totals so far."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    exit_depths: list[int]
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @classmethod
    def of(cls, req: Request) -> "RequestOutput":
        delta, tokens = req.stream_delta(req.finished)
        return cls(
            request_id=req.request_id,
            delta_text=delta,
            delta_token_ids=tokens,
            text=req.text,
            token_ids=list(req.output_token_ids),
            finished=req.finished,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_token_ids),
            exit_depths=list(req.exit_depths),
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finish_time=req.finish_time,
        )
