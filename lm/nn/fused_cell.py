"""The LSTM cell's pointwise part as one compiled loop per step (forward and backward).

:mod:`lm.nn.recurrence` runs a step as the recurrent product(s) plus about twenty small
elementwise torch ops, each a pass over a (B, H) or (B, 4H) tile with its own dispatch.
Here the same arithmetic (the recurrence module's docstring has it) is three C functions
that read each input once and write each output once:

* ``fwd``: ``a = xproj_t + p0 [+ p1 ∘ r]`` (``p0`` required); the gates ``i, f, g, o``; ``ĉ``, ``c_t``,
  ``ĥ``, ``h_t`` (zoneout, Semeniuta); the backward factors ``k_t``, ``k^c_t``; and the
  next step's product inputs ``h_t ∘ m`` and ``h_t ∘ (m ∘ s)``.
* ``bwd``: ``δĉ``, ``δa_t`` (and ``δa_t ∘ r`` for flipout), ``δc_{t-1}``.
* ``post``: ``δh_{t-1} = p0 ∘ m + p1 ∘ (m∘s) + z^h ∘ δh_t + δout_{t-1}`` after the
  backward product(s).

The source is compiled once per machine with the system C compiler (``cc``, ``-O3
-march=native``; glibc's vector math library ``libmvec`` gives SIMD ``exp``/``tanh``
without ``-ffast-math``, so inf and NaN behave as in torch) into a cache folder
(``$LM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/lm-kernels``, else ``~/.cache/lm-kernels``),
named by a hash of the source, the flags and the CPU, and loaded with :mod:`ctypes`.
No compiler, a failed build or a failed self-check makes :func:`library` return ``None``
and the recurrence keeps its torch ops. It is one candidate of the autotuner
(:mod:`lm.nn.kernels`), chosen only where it measures faster.

All tensors handed in must be contiguous (B, H) / (B, 4H) tiles of the dtype's C type
(float32 or float64, CPU); ``None`` stands for an absent optional operand.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

# One body, instantiated for float (suffix f32) and double (f64). Optional pointers are NULL
# when absent; the branches on them are loop-invariant, so the compiler hoists them.
_SOURCE = r"""
#include <stddef.h>

/* SIMD variants from glibc's libmvec; declared here so the vectorizer may call them without
   -ffast-math (which would also assume no inf/NaN). */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
double tanh(double);

#define INLINE static inline __attribute__((always_inline))
#define R2(M, n) M(n) M(n + 1)
#define R4(M, n) R2(M, n) R2(M, n + 2)
#define R8(M, n) R4(M, n) R4(M, n + 4)
#define R16(M, n) R8(M, n) R8(M, n + 8)
#define R32(M, n) R16(M, n) R16(M, n + 16)

/* The loop bodies take their options as compile-time constants (the dispatchers below
   instantiate every combination), so each instance is a branch-free loop the compiler
   vectorizes. NOISE: cm, zc, zh all present (absent ones passed as 1, 0, 0 tiles). */
#define DEFINE_CELL(T, S, EXP, TANH)                                                           \
INLINE void fwd_##S(long B, long H, const T *restrict xp, const T *restrict p0,               \
                    const T *restrict p1, const T *restrict r, T *restrict acts,               \
                    const T *restrict c_prev, const T *restrict h_prev, const T *restrict cm,  \
                    const T *restrict zc, const T *restrict zh, T *restrict c_out,             \
                    T *restrict h_out, T *restrict k, T *restrict kc, const T *restrict m,     \
                    T *restrict hm_next, const T *restrict ms, T *restrict hs_next,            \
                    const int FLIP, const int GRAD, const int NOISE, const int HM,             \
                    const int HS)                                                              \
{                                                                                              \
    const long G = 4 * H;                                                                      \
    for (long b = 0; b < B; b++) {                                                             \
        const long rg = b * G, rh = b * H;                                                     \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            T ai = xp[rg + j] + p0[rg + j], af = xp[rg + H + j] + p0[rg + H + j],              \
              ag = xp[rg + 2 * H + j] + p0[rg + 2 * H + j],                                    \
              ao = xp[rg + 3 * H + j] + p0[rg + 3 * H + j];                                    \
            if (FLIP) {                                                                        \
                ai += p1[rg + j] * r[rg + j];                                                  \
                af += p1[rg + H + j] * r[rg + H + j];                                          \
                ag += p1[rg + 2 * H + j] * r[rg + 2 * H + j];                                  \
                ao += p1[rg + 3 * H + j] * r[rg + 3 * H + j];                                  \
            }                                                                                  \
            const T i = (T)1 / ((T)1 + EXP(-ai));                                              \
            const T f = (T)1 / ((T)1 + EXP(-af));                                              \
            const T g = TANH(ag);                                                              \
            const T o = (T)1 / ((T)1 + EXP(-ao));                                              \
            acts[rg + j] = i; acts[rg + H + j] = f; acts[rg + 2 * H + j] = g;                  \
            acts[rg + 3 * H + j] = o;                                                          \
            const T d = NOISE ? cm[rh + j] : (T)1;                                             \
            const T gd = g * d;                                                                \
            const T cp = c_prev[rh + j];                                                       \
            const T ch = f * cp + i * gd;                                                      \
            const T tc = TANH(ch);                                                             \
            const T hh = o * tc;                                                               \
            const T c = NOISE ? ch + zc[rh + j] * (cp - ch) : ch;                              \
            const T h = NOISE ? hh + zh[rh + j] * (h_prev[rh + j] - hh) : hh;                  \
            c_out[rh + j] = c;                                                                 \
            h_out[rh + j] = h;                                                                 \
            if (GRAD) {                                                                        \
                const T keep = NOISE ? (T)1 - zh[rh + j] : (T)1;                               \
                k[rg + j] = (i - i * i) * gd;                                                  \
                k[rg + H + j] = (f - f * f) * cp;                                              \
                k[rg + 2 * H + j] = ((T)1 - g * g) * i * d;                                    \
                k[rg + 3 * H + j] = (o - o * o) * tc * keep;                                   \
                kc[rh + j] = ((T)1 - tc * tc) * o * keep;                                      \
            }                                                                                  \
            if (HM) hm_next[rh + j] = h * m[rh + j];                                           \
            if (HS) hs_next[rh + j] = h * ms[rh + j];                                          \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void lstm_fwd_##S(long B, long H, const T *xp, const T *p0, const T *p1, const T *r, T *acts, \
                  const T *c_prev, const T *h_prev, const T *cm, const T *zc, const T *zh,     \
                  T *c_out, T *h_out, T *k, T *kc, const T *m, T *hm_next, const T *ms,        \
                  T *hs_next)                                                                  \
{                                                                                              \
    const int opts = (p1 != NULL) | (k != NULL) << 1 | (cm != NULL) << 2                       \
                     | (hm_next != NULL) << 3 | (hs_next != NULL) << 4;                        \
    switch (opts) {                                                                            \
        R32(FWD_CASE_##S, 0)                                                                   \
    }                                                                                          \
}                                                                                              \
                                                                                               \
INLINE void bwd_##S(long B, long H, const T *restrict dh, const T *restrict dc,               \
                    const T *restrict k, const T *restrict kc, const T *restrict acts,         \
                    const T *restrict zc, T *restrict dg, const T *restrict r,                 \
                    T *restrict dgr, T *restrict dc_prev, const int ZC, const int DGR)         \
{                                                                                              \
    const long G = 4 * H;                                                                      \
    for (long b = 0; b < B; b++) {                                                             \
        const long rg = b * G, rh = b * H;                                                     \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < H; j++) {                                                         \
            const T dhj = dh[rh + j], dcj = dc[rh + j];                                        \
            const T z = ZC ? zc[rh + j] : (T)0;                                                \
            const T dch = (ZC ? dcj * ((T)1 - z) : dcj) + dhj * kc[rh + j];                   \
            const T gi = k[rg + j] * dch, gf = k[rg + H + j] * dch,                            \
                    gg = k[rg + 2 * H + j] * dch, go = k[rg + 3 * H + j] * dhj;                \
            dg[rg + j] = gi; dg[rg + H + j] = gf; dg[rg + 2 * H + j] = gg;                     \
            dg[rg + 3 * H + j] = go;                                                           \
            if (DGR) {                                                                         \
                dgr[rg + j] = gi * r[rg + j]; dgr[rg + H + j] = gf * r[rg + H + j];            \
                dgr[rg + 2 * H + j] = gg * r[rg + 2 * H + j];                                  \
                dgr[rg + 3 * H + j] = go * r[rg + 3 * H + j];                                  \
            }                                                                                  \
            const T dcp = dch * acts[rg + H + j];                                              \
            dc_prev[rh + j] = ZC ? dcp + z * dcj : dcp;                                        \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void lstm_bwd_##S(long B, long H, const T *dh, const T *dc, const T *k, const T *kc,          \
                  const T *acts, const T *zc, T *dg, const T *r, T *dgr, T *dc_prev)           \
{                                                                                              \
    switch ((zc != NULL) | (dgr != NULL) << 1) {                                               \
        R4(BWD_CASE_##S, 0)                                                                    \
    }                                                                                          \
}                                                                                              \
                                                                                               \
INLINE void post_##S(long n, const T *restrict p0, const T *restrict m, const T *restrict p1, \
                     const T *restrict ms, const T *restrict zh, const T *restrict dh,         \
                     const T *restrict dout, T *restrict dh_prev, const int M, const int P1,   \
                     const int ZH, const int DOUT)                                             \
{                                                                                              \
    _Pragma("omp simd")                                                                        \
    for (long j = 0; j < n; j++) {                                                             \
        T v = M ? p0[j] * m[j] : p0[j];                                                        \
        if (P1) v += p1[j] * ms[j];                                                            \
        if (ZH) v += zh[j] * dh[j];                                                            \
        if (DOUT) v += dout[j];                                                                \
        dh_prev[j] = v;                                                                        \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void lstm_post_##S(long n_, const T *p0, const T *m, const T *p1, const T *ms, const T *zh,    \
                   const T *dh, const T *dout, T *dh_prev)                                     \
{                                                                                              \
    switch ((m != NULL) | (p1 != NULL) << 1 | (zh != NULL) << 2 | (dout != NULL) << 3) {       \
        R16(POST_CASE_##S, 0)                                                                  \
    }                                                                                          \
}

#define FWD_CASE(S, n) case n: fwd_##S(B, H, xp, p0, p1, r, acts, c_prev, h_prev, cm, zc, zh,  \
    c_out, h_out, k, kc, m, hm_next, ms, hs_next, (n) & 1, (n) >> 1 & 1, (n) >> 2 & 1,         \
    (n) >> 3 & 1, (n) >> 4 & 1); break;
#define BWD_CASE(S, n) case n: bwd_##S(B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev,     \
    (n) & 1, (n) >> 1 & 1); break;
#define POST_CASE(S, n) case n: post_##S(n_, p0, m, p1, ms, zh, dh, dout, dh_prev, (n) & 1,    \
    (n) >> 1 & 1, (n) >> 2 & 1, (n) >> 3 & 1); break;
#define FWD_CASE_f32(n) FWD_CASE(f32, n)
#define FWD_CASE_f64(n) FWD_CASE(f64, n)
#define BWD_CASE_f32(n) BWD_CASE(f32, n)
#define BWD_CASE_f64(n) BWD_CASE(f64, n)
#define POST_CASE_f32(n) POST_CASE(f32, n)
#define POST_CASE_f64(n) POST_CASE(f64, n)

DEFINE_CELL(float, f32, expf, tanhf)
DEFINE_CELL(double, f64, exp, tanh)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
_LIBS = ["-lmvec", "-lm"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
build_error: Optional[str] = None        # why the library is unavailable (for reports)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LM_KERNEL_CACHE`` or the user's cache folder."""
    env = os.environ.get("LM_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lm-kernels"


def _cpu_id() -> str:
    """The CPU model and flags: ``-march=native`` code is only valid on the CPU it was built on."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    """Compile the source into the cache (once per source, flags, compiler and CPU)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS + _LIBS), cc, *version,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"lstm_cell_{key}.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "lstm_cell.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / lib.name
        res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out), *_LIBS],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError((res.stderr.strip().splitlines() or ["compiler failed"])[-1])
        os.replace(out, lib)           # atomic: concurrent builders never see a partial file
    return lib


def _self_check(lib: ctypes.CDLL) -> bool:
    """One step against the formulas in float64, fixed inputs (no RNG)."""
    B, H = 2, 3
    lin = lambda n, a, b: torch.linspace(a, b, n, dtype=torch.float64)  # noqa: E731
    xp = lin(B * 4 * H, -3.0, 3.0).view(B, 4 * H)
    c0, h0 = lin(B * H, -1.0, 1.0).view(B, H), lin(B * H, 0.5, -0.5).view(B, H)
    acts, k = torch.empty(B, 4 * H, dtype=torch.float64), torch.empty(B, 4 * H, dtype=torch.float64)
    c, h, kc = (torch.empty(B, H, dtype=torch.float64) for _ in range(3))
    fwd = _fn(lib, "fwd", torch.float64)
    p0 = torch.zeros_like(xp)
    fwd(B, H, _p(xp), _p(p0), None, None, _p(acts), _p(c0), _p(h0), None, None, None, _p(c), _p(h),
        _p(k), _p(kc), None, None, None, None)
    i, f, g, o = xp.view(B, 4, H).unbind(1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_ref = f * c0 + i * g
    return bool(torch.allclose(c, c_ref, rtol=1e-12, atol=1e-14)
                and torch.allclose(h, o * c_ref.tanh(), rtol=1e-12, atol=1e-14))


def _p(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


def _fn(lib: ctypes.CDLL, name: str, dtype: torch.dtype):
    fn = getattr(lib, f"lstm_{name}_{_SUFFIX[dtype]}")
    if fn.argtypes is None:
        nlong = 1 if name == "post" else 2
        nptr = {"fwd": 18, "bwd": 10, "post": 8}[name]
        fn.argtypes = [ctypes.c_long] * nlong + [ctypes.c_void_p] * nptr
        fn.restype = None
    return fn


def library() -> Optional[ctypes.CDLL]:
    """The compiled cell, built on first use; ``None`` where it cannot be had (see
    :data:`build_error`). ``LM_FUSED_CELL=0`` turns it off."""
    global _lib, _tried, build_error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("LM_FUSED_CELL", "1") == "0":
                raise RuntimeError("LM_FUSED_CELL=0")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler (cc/gcc) on PATH")
            lib = ctypes.CDLL(str(_build(cc)))
            if not _self_check(lib):
                raise RuntimeError("self-check against the torch formulas failed")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure: keep the torch ops
            build_error = f"{type(exc).__name__}: {exc}"
            _lib = None
        _tried = True
    return _lib


def supports(x: Tensor) -> bool:
    """Whether the compiled cell can run on tensors like ``x`` (CPU float32/float64)."""
    return x.device.type == "cpu" and x.dtype in _SUFFIX and library() is not None


class FusedCell:
    """The three step functions for one dtype, taking tensors (or ``None``).

    The compiled forward takes Semeniuta's and zoneout's tiles as one option, so where only
    some are given the others are stood in for by constant tiles (``cm`` = 1, ``z`` = 0),
    which give the same numbers.
    """

    def __init__(self, dtype: torch.dtype):
        lib = library()
        if lib is None:
            raise RuntimeError(f"fused LSTM cell unavailable: {build_error}")
        self._fwd = _fn(lib, "fwd", dtype)
        self._bwd = _fn(lib, "bwd", dtype)
        self._post = _fn(lib, "post", dtype)
        self._standins = {}

    def _standin(self, like: Tensor, value: float) -> Tensor:
        key = (tuple(like.shape), value)
        if key not in self._standins:
            self._standins[key] = torch.full_like(like, value)
        return self._standins[key]

    def fwd(self, B, H, xp, p0, p1, r, acts, c_prev, h_prev, cm, zc, zh, c_out, h_out, k, kc,
            m, hm_next, ms, hs_next):
        if p0 is None or (p1 is None) != (r is None) or (k is None) != (kc is None) \
                or (hm_next is not None and m is None) or (hs_next is not None and ms is None):
            raise ValueError("FusedCell.fwd: p0 is required; p1 needs r, k needs kc, "
                             "hm_next needs m, hs_next needs ms")
        if cm is not None or zc is not None or zh is not None:
            cm = self._standin(c_prev, 1.0) if cm is None else cm
            zc = self._standin(c_prev, 0.0) if zc is None else zc
            zh = self._standin(c_prev, 0.0) if zh is None else zh
        self._fwd(B, H, _p(xp), _p(p0), _p(p1), _p(r), _p(acts), _p(c_prev), _p(h_prev), _p(cm),
                  _p(zc), _p(zh), _p(c_out), _p(h_out), _p(k), _p(kc), _p(m), _p(hm_next),
                  _p(ms), _p(hs_next))

    def bwd(self, B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev):
        if dgr is not None and r is None:
            raise ValueError("FusedCell.bwd: dgr needs r")
        self._bwd(B, H, _p(dh), _p(dc), _p(k), _p(kc), _p(acts), _p(zc), _p(dg), _p(r), _p(dgr),
                  _p(dc_prev))

    def post(self, n, p0, m, p1, ms, zh, dh, dout, dh_prev):
        if (p1 is not None and ms is None) or (zh is not None and dh is None):
            raise ValueError("FusedCell.post: p1 needs ms, zh needs dh")
        self._post(n, _p(p0), _p(m), _p(p1), _p(ms), _p(zh), _p(dh), _p(dout), _p(dh_prev))
