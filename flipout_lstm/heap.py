"""Freed memory kept in the process's heap for reuse, on the CPU (glibc's malloc).

Why: glibc serves every block above its mmap threshold (adjusted at run time, at most 32 MiB
on 64-bit) with a fresh ``mmap`` and unmaps it on ``free``, and gives the top of its heap back
to the kernel once more than the trim threshold is free there. A training step allocates and
frees the same large tensors every step (the word study's logits and their gradient, 1400 ×
10000 floats = 56 MB each; the recurrence's per-step buffers), so every step faults all of
their pages in again, a few microseconds each under a hypervisor: 12% of the study's word step
on an AVX2 EPYC. CUDA tensors come from torch's caching allocator; CPU tensors come from plain
``malloc``.

How: ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap, and ``M_TRIM_THRESHOLD`` at
its maximum keeps freed heap memory mapped, so a block freed in step n is handed out again,
pages already present, in step n + 1. The price is resident memory: the process keeps the
largest heap it has needed (measured in docs/performance.md). This is the job jemalloc or
tcmalloc do for PyTorch when preloaded (``LD_PRELOAD``); doing it in process means that
``python train.py`` gets it with no environment to set up. ``LM_KEEP_FREED_MEMORY=0`` leaves
glibc's defaults. Elsewhere (musl, macOS, Windows) nothing is changed.

Numerics are untouched: where a tensor's memory comes from changes no value it holds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's own steady state, where its dynamic thresholds end up after the first large free on
# 64-bit: mmap above 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX), trim above twice that.
GLIBC_MMAP_THRESHOLD = 32 << 20
GLIBC_TRIM_THRESHOLD = 64 << 20
GLIBC_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: the largest, never trim

ENV = "LM_KEEP_FREED_MEMORY"


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differ or lack it
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_LIBC = _libc()
_kept = False


def available() -> bool:
    """This process's C library is glibc, whose heap these settings tune."""
    return _LIBC is not None


def kept() -> bool:
    """Whether :func:`keep_freed_memory` last turned keeping on in this process."""
    return _kept


def keep_freed_memory(keep: bool = True) -> bool:
    """Keep freed memory in the heap for reuse (``keep=True``), or go back to glibc's steady
    state (``keep=False``: its thresholds, and the heap's free memory returned to the kernel).
    With ``keep=True`` nothing happens where glibc is absent or ``LM_KEEP_FREED_MEMORY=0``.
    Returns whether freed memory is now kept. Affects blocks allocated from now on."""
    global _kept
    if _LIBC is None or (keep and os.environ.get(ENV, "1") == "0"):
        return _kept
    if keep:
        ok = _LIBC.mallopt(M_MMAP_MAX, 0) and _LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    else:
        ok = (_LIBC.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
              and _LIBC.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
              and _LIBC.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD))
        _LIBC.malloc_trim(0)
    if ok:
        _kept = keep
    return _kept
