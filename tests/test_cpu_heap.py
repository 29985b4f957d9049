"""keep_freed_memory: inside it a freed large buffer is reused instead of faulted in again (kernel
counters); leaving it gives the memory back."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# Allocates a filled 128 MB tensor and frees it, as a training step does with its logits, 24 times
# and prints the page faults. Without reuse every step faults in 32k fresh 4 KB pages (fewer with
# huge pages); with it the heap grows now and then (seen: 2 to 6 times in 24 steps, when other
# allocations split the freed block) and serves the other steps.
PROBE = """
import resource, sys, torch
if sys.argv[1] == "1":
    from recursify.cpu_heap import keep_freed_memory
    heap = keep_freed_memory()
    assert heap.__enter__()
    with keep_freed_memory() as nested:  # a nested block keeps the outer one's setting
        assert nested
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    x = torch.ones(32 * 2**20)
    del x
f0 = faults()
for _ in range(24):
    step()
print(faults() - f0)
"""


def _faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, str(int(keep))], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_not_faulted_in_again():
    off, on = _faults(False), _faults(True)
    if off < 24 * 1000:
        pytest.skip(f"this kernel faulted only {off} times in 24 steps without it (huge pages): nothing to compare")
    assert on < off / 2, (on, off)  # at most half the steps grow the heap, against all 24


# Frees a 256 MB tensor inside the block and prints the resident memory (MB) there and after it.
RELEASE = """
import os, torch
from recursify.cpu_heap import keep_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
with keep_freed_memory() as on:
    assert on
    x = torch.ones(64 * 2**20)
    del x
    inside = rss()
print(inside, rss())
"""


def test_leaving_the_block_returns_the_freed_memory():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True)
    inside, after = map(int, out.stdout.split()[-2:])
    assert inside - after > 200, (inside, after)  # the freed 256 MB stayed resident inside, not after


# Grows glibc's mmap threshold as a big freed tensor does, then allocates 64 blocks of 8 MiB and frees
# every other one: from the heap, the freed ones stay resident as holes between live blocks.
HOLES = """
import os, sys, torch
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
def run():
    x = torch.ones(4 * 2**20)  # 16 MiB, served by mmap; freeing it raises glibc's threshold to 16 MiB
    del x
    blocks = [torch.ones(2 * 2**20) for _ in range(64)]  # 64 x 8 MiB = 512 MiB
    before = rss()
    del blocks[::2]
    return before - rss()
if sys.argv[1] == "1":
    from recursify.cpu_heap import return_freed_memory
    with return_freed_memory() as ok:
        assert ok
        print(run())
else:
    print(run())
"""


def _returned_mib(lean: bool) -> int:
    out = subprocess.run([sys.executable, "-c", HOLES, str(int(lean))], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_return_freed_memory_gives_back_blocks_freed_between_live_ones():
    default, lean = _returned_mib(False), _returned_mib(True)
    assert lean > 200, lean  # the 32 freed 8 MiB blocks (256 MiB) left the process at once
    assert default < lean / 2, (default, lean)  # without it most of them stayed resident
