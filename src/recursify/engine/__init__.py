"""Serving engine: continuous depth-wise batching with early exit for Recursive Transformers.

Kept in separate layers, as in vLLM: `request` (what is asked), `kv_cache` (fixed-budget memory,
slot allocation apart from the tensors), `scheduler` (what runs each step, and every state change),
`batch` (the plain data between scheduler and runner), `runner` (one batched forward), `exit_policy`
(when a token leaves early), `exit_classifier` (the learned per-boundary exit probes), `sampling`, `speculative` (lossless self-speculative decoding at batch 1)
and `engine` (the loop tying them together, sync and async).
"""

from .batch import Batch, Row, RowOutput, RunnerOutput
from .engine import AsyncLLMEngine, EngineStoppedError, LLMEngine, StepStats
from .kv_cache import CacheBudgetError, KVCache, SlotAllocator
from .request import ParamError, Request, RequestOutput, SamplingParams
from .exit_classifier import ExitClassifier, ExitClassifierError
from .exit_policy import EXIT_MODES, ExitConfig, ExitPolicy, resolve_exit
from .runner import ModelRunner
from .scheduler import QueueFullError, Scheduler, WorkItem
from .speculative import SelfSpeculativeDecoder, SpeculativeStats

__all__ = [
    "AsyncLLMEngine",
    "Batch",
    "CacheBudgetError",
    "EngineStoppedError",
    "EXIT_MODES",
    "ExitClassifier",
    "ExitClassifierError",
    "ExitConfig",
    "ExitPolicy",
    "KVCache",
    "LLMEngine",
    "ModelRunner",
    "ParamError",
    "QueueFullError",
    "Request",
    "RequestOutput",
    "Row",
    "RowOutput",
    "RunnerOutput",
    "SamplingParams",
    "Scheduler",
    "SelfSpeculativeDecoder",
    "SlotAllocator",
    "SpeculativeStats",
    "StepStats",
    "WorkItem",
    "resolve_exit",
]
