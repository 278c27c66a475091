"""The host process's memory: handing freed heap pages back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_host_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    glibc serves allocations above its mmap threshold with mmap and returns them on free, but
    the threshold rises (to 32 MiB) after the first such free, so later tensors below it come
    from the heap, whose freed pages stay in the process. Measured on a 350m ZeRO-3 CPU build
    (tools/bench_host_memory.py): 2.2 GiB resident after building a model whose shard is 0.6
    GiB. Called after a model build and a stage hand-over, where one-off tensors churn."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation with its own mapping (``free_large_blocks_promptly``)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def free_large_blocks_promptly(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of at least ``threshold`` bytes with its own mapping (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), so that freeing it returns it to the OS at once; False where
    unavailable. glibc's own threshold rises after the first large free (up to 32 MiB), after
    which tensors below it come from the heap, whose freed pages stay with the process: a
    training step's transients (gradient buckets, the optimizer's fp32 working copies) then grow
    the resident set beyond what the step holds. Setting the threshold also stops it rising.
    Measured (tools/bench_bytes.py, 350m, one CPU rank, bf16): int8 states and bf16 masters save
    0.80 of the planner's saving in peak RSS instead of 0.66. Called once, at the start of a run."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
