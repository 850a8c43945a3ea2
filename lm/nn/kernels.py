"""Kernel choice by measurement: each operation of the recurrence picks the fastest candidate.

The fastest way to run a step of the recurrence depends on the CPU (AVX2 or AVX-512, cache
sizes, core count), the thread count, the dtype and the shape: MKL's packed-weight product
wins on one machine and loses on the next. As cuDNN's benchmark mode does, the first call
with a new key times every candidate on inputs of that shape and keeps the fastest for the
rest of the process::

    name = choose("fwd_pair", key, ["packed", "bmm", "mm"], make_runners)

``make_runners()`` returns ``{name: run}`` with ``run()`` one call of that candidate on
synthetic inputs (drawn from a private generator: the global RNG is never touched, so an
exactly resumed run draws the same noise as an uninterrupted one). It is only called on a
cache miss. Each candidate is warmed up, then timed in alternating order over a few rounds,
and the median decides; a candidate that raises is dropped.

Forcing a choice (tests, reproducible speed figures):

* ``LM_LSTM_KERNELS="op=name,op=name"`` in the environment, read on every cache miss; ``op``
  may be ``*`` (every operation), and ``name`` may be ``default`` (the first available
  candidate, untimed). ``LM_LSTM_KERNELS=*=default`` turns timing off altogether.
* :func:`force` / :func:`forced` from code, which override the environment.

A forced name that is not available for an operation (``packed`` or ``onednn`` for
float64, ``fused`` without a compiler) falls back to that operation's default, so one setting
serves every dtype. :func:`choices` lists what was chosen (and the measured times), for reports.

Choices are also kept on disk (:func:`choices_path`, one JSON file per CPU and torch
version) and read back by later processes: candidates agree only to rounding, so a run
resumed in a new process must take the kernels the interrupted one took to continue
bit for bit. ``persist = False`` (or ``LM_KERNEL_CHOICES=""``) keeps choices in memory only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import fused_cell

ENV = "LM_LSTM_KERNELS"

# The operations and their candidates, in default order (the first available one is used
# when timing is off).
OPS: Dict[str, Tuple[str, ...]] = {
    "fwd_product": ("packed", "mm", "onednn"),         # h̃ W̄ᵀ, one product per step
    "fwd_pair": ("packed", "bmm", "mm", "onednn"),     # h̃ W̄ᵀ and (h̃∘s) ΔŴᵀ: two packed,
                                                       # one bmm, two mm or two oneDNN
    "bwd_product": ("mm", "packed", "onednn"),         # δa W̄
    "bwd_pair": ("bmm", "mm", "packed", "onednn"),     # δa W̄ and (δa∘r) ΔŴ
    "cell": ("fused", "torch"),             # the pointwise step: compiled loop or torch ops
}

_lock = threading.RLock()
_cache: Dict[tuple, str] = {}
_timings: Dict[tuple, Dict[str, float]] = {}
_forced: Dict[str, str] = {}
tunings = 0                                  # how many keys were timed (tests read it)
persist = True                               # keep choices on disk for later processes
_disk: Optional[Dict[str, str]] = None       # the file's choices, read once


def choices_path() -> Optional[Path]:
    """The on-disk choices: ``$LM_KERNEL_CHOICES`` (empty: none), else a file in the kernel
    cache folder named by the CPU and the torch version."""
    env = os.environ.get("LM_KERNEL_CHOICES")
    if env is not None:
        return Path(env) if env else None
    tag = hashlib.sha256((fused_cell._cpu_id() + torch.__version__).encode()).hexdigest()[:12]
    return fused_cell.cache_dir() / f"choices-{tag}.json"


def _disk_get(key: str) -> Optional[str]:
    global _disk
    path = choices_path() if persist else None
    if path is None:
        return None
    if _disk is None:
        try:
            _disk = json.loads(path.read_text())
        except (OSError, ValueError):
            _disk = {}
    return _disk.get(key)


def _disk_put(key: str, name: str) -> None:
    """Merge one choice into the file (read, update, atomic replace); failures are silent:
    the file only saves a later process the timing."""
    global _disk
    path = choices_path() if persist else None
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = {}
        current[key] = name
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(current, indent=0, sort_keys=True))
        os.replace(tmp, path)
        _disk = current
    except OSError:
        pass


def _parse_env() -> Dict[str, str]:
    spec = os.environ.get(ENV, "").strip()
    out: Dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, name = item.partition("=")
        if not sep or (op.strip() != "*" and op.strip() not in OPS):
            raise ValueError(f"{ENV}={spec!r}: bad item {item!r}; write op=name with op one of "
                             f"{', '.join(OPS)} or *, e.g. {ENV}=cell=torch,fwd_pair=bmm")
        out[op.strip()] = name.strip()
    return out


def _forced_name(op: str) -> Optional[str]:
    if op in _forced:
        return _forced[op]
    if "*" in _forced:
        return _forced["*"]
    env = _parse_env()
    return env.get(op, env.get("*"))


def force(**choices: Optional[str]) -> Dict[str, str]:
    """Force ``op=name`` choices (``None`` un-forces one; ``star`` stands for ``*``) and drop
    the cache so that they take effect; returns the previous forced set."""
    global _forced
    with _lock:
        before = dict(_forced)
        for op, name in choices.items():
            op = "*" if op == "star" else op
            if op != "*" and op not in OPS:
                raise ValueError(f"unknown kernel operation {op!r}; one of {', '.join(OPS)}")
            if name is None:
                _forced.pop(op, None)
            else:
                _forced[op] = name
        _cache.clear()
        return before


@contextlib.contextmanager
def forced(**choices: Optional[str]) -> Iterator[None]:
    """``with forced(cell="torch"): ...`` forces choices inside the block only."""
    global _forced
    with _lock:
        before = force(**choices)
    try:
        yield
    finally:
        with _lock:
            _forced = before
            _cache.clear()


def clear() -> None:
    """Forget every choice in memory (the next call of each key looks at the disk file, then
    times again)."""
    global _disk
    with _lock:
        _cache.clear()
        _timings.clear()
        _disk = None


def choices() -> Dict[tuple, str]:
    """``{key: name}`` for every choice made so far in this process."""
    with _lock:
        return dict(_cache)


def timings() -> Dict[tuple, Dict[str, float]]:
    """``{key: {name: seconds per call}}`` for every key that was timed."""
    with _lock:
        return {k: dict(v) for k, v in _timings.items()}


def _measure(runners: Dict[str, Callable[[], None]], rounds: int = 5,
             min_sample_s: float = 2e-3) -> Dict[str, float]:
    """Median seconds per call of each runner; runners that raise are left out."""
    per_call: Dict[str, float] = {}
    for name, run in list(runners.items()):
        try:
            run()                                                  # warm-up (first-touch, JIT)
            t0 = time.perf_counter()
            run()
            per_call[name] = max(time.perf_counter() - t0, 1e-7)
        except Exception:  # noqa: BLE001 - a candidate that fails here is not a candidate
            runners.pop(name)
    reps = {n: max(1, min(1000, int(min_sample_s / t) + 1)) for n, t in per_call.items()}
    samples: Dict[str, List[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(rounds):
        # Alternating order: a burst of load from another process hits every candidate.
        for name in (names if r % 2 == 0 else names[::-1]):
            run, n = runners[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            samples[name].append((time.perf_counter() - t0) / n)
    return {n: statistics.median(s) for n, s in samples.items()}


def choose(op: str, key: tuple, available: Sequence[str],
           make_runners: Callable[[], Dict[str, Callable[[], None]]]) -> str:
    """The candidate of ``op`` to use for ``key`` (see the module docstring).

    ``available``: the candidates that can run here, in :data:`OPS` order. The cache key is
    ``(op, threads) + key + (available,)``; ``key`` should hold the device, dtype, shape and
    variant. The candidates are part of it so that a choice made before a new candidate
    existed is timed again rather than read back from disk.
    """
    global tunings
    if not available:
        raise ValueError(f"no candidate for kernel operation {op!r}")
    full = (op, torch.get_num_threads()) + tuple(key) + (tuple(available),)
    with _lock:
        hit = _cache.get(full)
        if hit is not None:
            return hit
        want = _forced_name(op)
        if want is not None:
            name = want if want in available else available[0]
        elif len(available) == 1:
            name = available[0]
        elif _disk_get(repr(full)) in available:
            name = _disk_get(repr(full))
        else:
            times = _measure(make_runners())
            tunings += 1
            _timings[full] = times
            name = min(times, key=times.get) if times else available[0]
            _disk_put(repr(full), name)
        _cache[full] = name
        return name
