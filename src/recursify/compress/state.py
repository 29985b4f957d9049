"""The resume record of `recursify compress`: what each finished stage measured or decided, kept in
`.<out>.work/state.json`, so that a killed run picks up where it stopped and the summary reports
every stage whichever attempt ran it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import CompressConfig, CompressError

STATE_FILE = "state.json"

# What only decides what is measured at the end: a resumed run may add or drop it.
EVALUATION_ONLY = ("overwrite", "baseline", "baseline_lr", "paper_tasks")


def identity(cfg: CompressConfig | dict) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    config = asdict(cfg) if isinstance(cfg, CompressConfig) else cfg
    return {k: v for k, v in config.items() if k not in EVALUATION_ONLY}


@dataclass
class RunState:
    config: dict = field(default_factory=dict)  # `identity` of the request that started the run
    spent: float = 0.0  # seconds of the budget every attempt together has spent
    # 2-3. measured before the conversion, planned, converted
    teacher_ppl: float | None = None
    fwd_tok_s: float | None = None  # the teacher's forward tokens/s here: the planner's speed
    sequential: bool = True  # still planned (an interrupted conversion resumes with the plan's choices)
    curvature: bool = True
    layout_search: list | None = None  # --loops auto: each layout's loops, rank, params and converted ppl
    calib_seconds: float | None = None
    before: float | None = None  # the converted model's held-out perplexity
    student_params: int | None = None
    # 4. distillation
    local_tokens: int | None = None
    local_steps: int | None = None
    after_local: float | None = None
    max_tokens: int | None = None  # KD's, fixed by the first attempt that reached it
    train_tokens: int | None = None
    train_steps: int | None = None
    train_tok_s: float | None = None
    train_seconds: float | None = None  # all attempts' steps, resumes included
    baseline_tokens: int | None = None
    baseline_lr: float | None = None

    def matches(self, cfg: CompressConfig) -> bool:
        return identity(self.config) == identity(cfg)

    def update(self, **values) -> None:
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise AttributeError(f"RunState has no field {', '.join(sorted(unknown))}")
        for k, v in values.items():
            setattr(self, k, v)

    def save(self, path: str | Path) -> None:
        """Written whole or not at all: a kill while saving leaves the previous record."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> RunState | None:
        """The record at `path`, None when there is none; CompressError when it cannot be one."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CompressError(f"cannot read the interrupted run's {path} ({e}); pass --overwrite to start "
                                "afresh") from None
        problem = _problem(raw)
        if problem:
            raise CompressError(f"{path} is not a recursify compress state ({problem}); pass --overwrite to start "
                                "afresh")
        return cls(**raw)


_KINDS = {"float": (int, float), "int": (int,), "bool": (bool,), "dict": (dict,), "list": (list,),
          "None": (type(None),)}


def _problem(raw) -> str | None:
    """What makes `raw` (parsed JSON) no RunState, or None."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not an object"
    known = {f.name: f.type for f in fields(RunState)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        return f"unknown fields {', '.join(unknown)}"
    if "config" not in raw:
        return "no config"
    for name, value in raw.items():
        kinds = tuple(t for part in known[name].split("|") for t in _KINDS[part.strip()])
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # true is no number
            return f"{name} is {value!r}"
    return None


__all__ = ["EVALUATION_ONLY", "STATE_FILE", "RunState", "identity"]
