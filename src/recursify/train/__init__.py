"""Uptraining a recursive student by distillation.

`config` (what a run depends on, its command line), `trainer` (the loop: setup, resume, step,
evaluate, save), `checkpoint` (resumable state on disk), `losses` (KD, CE, early exits) and
`metrics` (held-out evaluation, metrics.jsonl, the loss plot).
"""

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import TrainConfig, TrainError

__all__ = ["TrainConfig", "TrainError", "latest_checkpoint", "list_checkpoints", "main", "train"]


def __getattr__(name: str):
    # The loop is imported on first use, not here: `python -m recursify.train.trainer` (the
    # torchrun entry point) must not find its own module already imported by this package.
    if name in ("train", "main"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
