"""The recurrence's large buffers, kept between calls: a small caching allocator for the CPU.

Why: glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB) straight from
the kernel and unmaps them on ``free``, so each call of the recurrence faults every page of
its big per-step buffers in again. At the char shape (batch 32, 100 steps, 1000 units) a
flipout forward + backward allocates about 250 MB of them, some 60k page faults, each a
few microseconds under a hypervisor. Measured on an AVX-512 EPYC under KVM (1 thread, 10
paired runs of fwd+bwd with ``LM_LSTM_WORKSPACE=0`` against the pool), the pool saves 5-16%
of a training step at the character and word shapes (Gal, zoneout, flipout). CUDA tensors
come from torch's caching allocator and never pay this; CPU tensors have none, so the
recurrence keeps its own.

How: a buffer is handed out as a view of a pooled 1-D base tensor. Every view (kept by
autograd for the backward, returned to the caller, or held by the caller afterwards) holds a
reference to the base's storage, so the base is free again exactly when the pool holds the
only reference. A graph kept with ``retain_graph=True`` or an output the caller stores keeps
its buffer out of the pool for as long as it lives. The reference count is torch's storage
use count (``torch._C._storage_Use_Count``, private); where it is missing nothing is pooled.

Sizes are rounded up to 1/8 of their power of two, so that variable-length batches (BPTT
lengths that differ by a few steps) share buffers; at most :data:`MAX_BUFFERS` bases are
kept, free ones dropped oldest first. ``LM_LSTM_WORKSPACE=0`` turns pooling off;
:func:`clear` empties the pool.
"""
from __future__ import annotations

import math
import os
import threading
from typing import List, Optional, Sequence

import torch
from torch import Tensor

MIN_BYTES = 1 << 20          # smaller blocks come from malloc's heap, which keeps its pages
MAX_BUFFERS = 64

_lock = threading.Lock()
_pool: List[Tensor] = []
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _refs(base: Tensor) -> int:
    return _use_count(base.untyped_storage()._cdata)


# The count of a base nothing else refers to: the pool's tensor plus the temporary storage
# object that asking creates. Measured, not assumed, in case torch counts differently.
_FREE = _refs(torch.empty(1)) if _use_count is not None else None


def enabled() -> bool:
    return _FREE is not None and os.environ.get("LM_LSTM_WORKSPACE", "1") != "0"


def _rounded(n: int) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (at most 12.5% more)."""
    step = max(1, 1 << max(0, math.ceil(math.log2(n)) - 3))
    return -(-n // step) * step


def empty(shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized tensor of ``shape`` with ``like``'s device and dtype (or ``dtype``),
    from the pool where it is large and on the CPU (else ``like.new_empty``)."""
    n = math.prod(shape)
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu" or n * dtype.itemsize < MIN_BYTES or not enabled():
        return like.new_empty(shape, dtype=dtype)
    with _lock:
        best = None
        for base in _pool:
            if base.dtype == dtype and n <= base.numel() <= 2 * n and _refs(base) == _FREE \
                    and (best is None or base.numel() < best.numel()):
                best = base
        if best is None:
            best = torch.empty(_rounded(n), dtype=dtype, device=like.device)
            _pool.append(best)
            while len(_pool) > MAX_BUFFERS:          # drop the oldest free base, if any
                # By position: list.remove would compare tensors with ==, elementwise.
                free = next((i for i, b in enumerate(_pool)
                             if b is not best and _refs(b) == _FREE), None)
                if free is None:
                    break
                del _pool[free]
        return best[:n].view(shape)


def clear() -> None:
    """Drop every pooled buffer (those still in use live on with their users)."""
    with _lock:
        _pool.clear()


def pooled_bytes() -> int:
    """Bytes held by the pool, in use or free."""
    with _lock:
        return sum(b.numel() * b.element_size() for b in _pool)
