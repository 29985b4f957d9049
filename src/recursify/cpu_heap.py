"""Keep freed tensor memory in the process instead of handing it back to the kernel (glibc, Linux).

A training step allocates and frees the same large buffers every time: activations, the [batch,
seq, vocab] logits of teacher and student, their log-softmaxes and gradients. glibc serves every
allocation above its mmap threshold (at most 32 MB) with fresh pages and unmaps them on free, so the
next step's buffer is faulted in and zeroed by the kernel page by page again. On the 2-core CPU a
KD step of SmolLM2 spent about a sixth of its CPU time there (`benchmarks/train.py` measures the
step with and without). With mmap off and no trimming, freed blocks stay in the heap and the next
step reuses them; the cost is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # <malloc.h>: free heap memory above this much is returned to the kernel
M_MMAP_MAX = -4  # <malloc.h>: at most this many allocations served by mmap (0: none)
_DONE = {"on": False}


def keep_freed_memory() -> bool:
    """Switch glibc's allocator to reusing freed memory; True when it is on (now or before).

    A no-op returning False off glibc (macOS, Windows, musl): their allocators are left as they are.
    """
    if _DONE["on"]:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int, so its largest value means "never".
    _DONE["on"] = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _DONE["on"]


__all__ = ["keep_freed_memory"]
