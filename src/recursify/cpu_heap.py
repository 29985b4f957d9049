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
memory back.
"""

from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1  # <malloc.h>: free heap memory above this much is returned to the kernel
M_MMAP_MAX = -4  # <malloc.h>: at most this many allocations served by mmap (0: none)
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}  # glibc's own
_depth = {"n": 0}


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
    freed blocks otherwise stay resident under the next stage's peak.
    """
    libc = _glibc()
    if libc is not None and _depth["n"] == 0:
        libc.malloc_trim(0)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc's allocator reuses freed memory; yields whether it does.
    With `enabled` False the block changes nothing (and yields False).

    Off glibc (macOS, Windows, musl) it yields False and leaves the allocator as it is. Nested
    blocks share the outermost one's setting; leaving that one restores glibc's defaults and
    returns the free heap memory to the kernel.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    # mallopt returns 1 on success; the trim threshold is an int, so its largest value means "never".
    on = _depth["n"] > 0 or (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1)
    _depth["n"] += 1
    try:
        yield on
    finally:
        _depth["n"] -= 1
        if _depth["n"] == 0:
            for param, value in DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


__all__ = ["keep_freed_memory", "release_freed_memory"]
