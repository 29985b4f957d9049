"""Keep freed tensor memory in the process during training instead of handing it back to the
kernel (glibc, Linux).

A training step allocates and frees the same large buffers every time: activations, the [batch,
seq, vocab] logits of teacher and student, their log-softmaxes and gradients. glibc serves every
allocation above its mmap threshold (at most 32 MB) with fresh pages and unmaps them on free, so the
next step's buffer is faulted in and zeroed by the kernel page by page again. On the 2-core CPU a
KD step of SmolLM2 spent about a sixth of its CPU time there (`benchmarks/cpu_heap.py` measures the
step with and without). With mmap off and no trimming, freed blocks stay in the heap and the next
step reuses them. Outside a loop of same-sized steps the retained heap only grows (held for a whole
`compress` of Gemma 3, it filled a 24 GiB machine in the final evaluation of its 262k-vocabulary
logits), so the setting holds inside `keep_freed_memory()` only, and leaving it gives the freed
memory back. `return_freed_memory()` is the opposite, for a run whose peak must stay at what is
alive: every buffer from 1 MiB up is its own mapping, returned to the kernel when freed.
"""

from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1  # <malloc.h>: free heap memory above this much is returned to the kernel
M_MMAP_THRESHOLD = -3  # <malloc.h>: allocations from this size up get their own mapping
M_MMAP_MAX = -4  # <malloc.h>: at most this many allocations served by mmap (0: none)
# glibc's own (its mmap threshold starts at 128 KiB and then follows the largest freed block up to
# 32 MiB; once set, it stays where it is set).
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 128 * 1024}
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no mappings, never trim: freed blocks are reused
# Every allocation from 1 MiB up (every tensor that matters) is its own mapping, unmapped when freed:
# no freed block stays resident under a later peak. Left to itself, glibc raises its threshold to
# the largest block freed so far, and the blocks below 32 MiB (a 1B model's gradients, AdamW's
# temporaries) then come from the heap, whose holes stay resident: 1.1 GiB over the backward of a KD
# step with a 369M-parameter teacher (`benchmarks/kd_memory.py`).
RETURN = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 1 << 20}
_stack: list[dict[int, int]] = []


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel now (glibc's `malloc_trim`; a no-op elsewhere).

    Between stages that free gigabytes (a conversion's temporaries, a finished training run), the
    freed blocks otherwise stay resident under the next stage's peak. Inside `keep_freed_memory()`
    it does nothing: that block keeps them on purpose.
    """
    libc = _glibc()
    if libc is not None and KEEP not in _stack:
        libc.malloc_trim(0)


@contextmanager
def _allocator(settings: dict[int, int]) -> Iterator[bool]:
    """glibc's allocator with `settings` inside the block, the enclosing block's (or glibc's
    defaults) after it, then the free heap memory trimmed; yields whether mallopt took them."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    # mallopt returns 1 on success; the trim threshold is an int, so its largest value means "never".
    ok = all(libc.mallopt(k, v) == 1 for k, v in settings.items())
    _stack.append(settings)
    try:
        yield ok
    finally:
        _stack.pop()
        for k, v in {**DEFAULTS, **(_stack[-1] if _stack else {})}.items():
            libc.mallopt(k, v)
        if KEEP not in _stack:
            libc.malloc_trim(0)


def keep_freed_memory():
    """Within the block, glibc's allocator reuses freed memory (faster steps: no page faults for
    buffers freed and allocated again); yields whether it does.

    Off glibc (macOS, Windows, musl) it yields False and leaves the allocator as it is. A block
    nested in another sets its own mode; leaving it restores the enclosing one's (glibc's defaults
    after the outermost), and returns the free heap memory to the kernel.
    """
    return _allocator(KEEP)


def return_freed_memory():
    """Within the block, every freed buffer from 1 MiB up goes back to the kernel at once, so the
    resident memory stays at what is alive (at the price of page faults when buffers are
    allocated again); yields whether glibc took the setting."""
    return _allocator(RETURN)


__all__ = ["keep_freed_memory", "release_freed_memory", "return_freed_memory"]
