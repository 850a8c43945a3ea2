"""The LSTM cell's pointwise part as one compiled loop per step (forward and backward).

:mod:`flipout_lstm.nn.recurrence` runs a step as the recurrent product(s) plus about twenty small
elementwise torch ops (:class:`flipout_lstm.nn.recurrence.TorchCell`), each a pass over a (B, H) or
(B, 4H) tile with its own dispatch. Here the same arithmetic (the recurrence module's
docstring has it) is three C++ functions that read each input once and write each output
once:

* ``fwd``: ``a = xproj_t + p0 [+ p1 ∘ r]`` (``p0`` required); the gates ``i, f, g, o``;
  ``ĉ``, ``c_t``, ``ĥ``, ``h_t`` (zoneout, Semeniuta); the backward factors ``k_t``,
  ``k^c_t``; and the next step's product inputs ``h_t ∘ m`` and ``h_t ∘ (m ∘ s)``.
* ``bwd``: ``δĉ``, ``δa_t`` (and ``δa_t ∘ r`` for flipout), ``δc_{t-1}``.
* ``post``: ``δh_{t-1} = p0 ∘ m + p1 ∘ (m∘s) + z^h ∘ δh_t + δout_{t-1}`` after the
  backward product(s).

Measured against the torch-ops cell (AVX-512 EPYC, 1 thread, fwd+bwd of the layer, 10
paired runs): Gal 6-7% and zoneout 6-8% of a training step faster at the character and
word shapes; flipout, whose products dominate, within noise.

Built with ``torch.utils.cpp_extension.load_inline`` on first use, once per machine (torch
keeps it in its extension folder, ``$TORCH_EXTENSIONS_DIR``, and rebuilds only when the source
or flags change), ``-O3 -march=native`` under a name that holds a hash of the CPU model and
flags. The functions are registered as torch operators (``torch.ops.<name>.fwd``) with
``<torch/library.h>`` rather than as a pybind11 module with ``<torch/extension.h>``: on a
2-core AVX2 EPYC the build took 32 s of compiler CPU time against 80 s (that header alone
parses in 68 s, ``<torch/library.h>`` in 12 s), and a call costs 1-3 µs more, under 0.1% of a
step at the character shape. glibc's vector math library ``libmvec`` gives
SIMD ``exp``/``tanh`` without ``-ffast-math``, so inf and NaN behave as in torch. No
compiler, a failed build or a failed self-check makes :func:`library` return ``None`` and
the recurrence uses :class:`~flipout_lstm.nn.recurrence.TorchCell`; ``LM_FUSED_CELL=0`` turns it off.

Tensors: contiguous (B, H) / (B, 4H) CPU tiles of the state dtype (float32 or float64),
``None`` for an absent optional operand; the products ``p0``, ``p1`` may also be bfloat16
with a float32 state (mixed precision: they are widened as they are read).
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from flipout_lstm.nn import cpuinfo

_SOURCE = r"""
#include <array>
#include <cstdint>
#include <utility>

/* SIMD variants from glibc's libmvec, declared before the torch headers pull in <cmath> so
   that the vectorizer may call them without -ffast-math (which would also assume no
   inf/NaN). */
extern "C" {
#pragma omp declare simd notinbranch
float expf(float) noexcept;
#pragma omp declare simd notinbranch
float tanhf(float) noexcept;
#pragma omp declare simd notinbranch
double exp(double) noexcept;
#pragma omp declare simd notinbranch
double tanh(double) noexcept;
}

#include <torch/library.h>

using at::Tensor;
using Opt = std::optional<Tensor>;

static inline float EXP(float x) { return expf(x); }
static inline float TANH(float x) { return tanhf(x); }
static inline double EXP(double x) { return exp(x); }
static inline double TANH(double x) { return tanh(x); }

/* The loop bodies take their options as compile-time constants (a table instantiates
   every combination), so each instance is a branch-free loop the compiler vectorizes.
   NOISE: cm, zc, zh all present (absent ones passed as 1, 0, 0 tiles). P: the type of the
   products p0, p1 (T, or bfloat16 under mixed precision). */
template <typename T, typename P, int O>
static void fwd_loop(int64_t B, int64_t H, const T *__restrict xp, const P *__restrict p0,
                     const P *__restrict p1, const T *__restrict r, T *__restrict acts,
                     const T *__restrict c_prev, const T *__restrict h_prev,
                     const T *__restrict cm, const T *__restrict zc, const T *__restrict zh,
                     T *__restrict c_out, T *__restrict h_out, T *__restrict k,
                     T *__restrict kc, const T *__restrict m, T *__restrict hm_next,
                     const T *__restrict ms, T *__restrict hs_next)
{
    constexpr bool FLIP = O & 1, GRAD = O >> 1 & 1, NOISE = O >> 2 & 1, HM = O >> 3 & 1,
                   HS = O >> 4 & 1;
    const int64_t G = 4 * H;
    for (int64_t b = 0; b < B; b++) {
        const int64_t rg = b * G, rh = b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            T ai = xp[rg + j] + (T)p0[rg + j], af = xp[rg + H + j] + (T)p0[rg + H + j],
              ag = xp[rg + 2 * H + j] + (T)p0[rg + 2 * H + j],
              ao = xp[rg + 3 * H + j] + (T)p0[rg + 3 * H + j];
            if (FLIP) {
                ai += (T)p1[rg + j] * r[rg + j];
                af += (T)p1[rg + H + j] * r[rg + H + j];
                ag += (T)p1[rg + 2 * H + j] * r[rg + 2 * H + j];
                ao += (T)p1[rg + 3 * H + j] * r[rg + 3 * H + j];
            }
            const T i = (T)1 / ((T)1 + EXP(-ai));
            const T f = (T)1 / ((T)1 + EXP(-af));
            const T g = TANH(ag);
            const T o = (T)1 / ((T)1 + EXP(-ao));
            acts[rg + j] = i; acts[rg + H + j] = f; acts[rg + 2 * H + j] = g;
            acts[rg + 3 * H + j] = o;
            const T d = NOISE ? cm[rh + j] : (T)1;
            const T gd = g * d;
            const T cp = c_prev[rh + j];
            const T ch = f * cp + i * gd;
            const T tc = TANH(ch);
            const T hh = o * tc;
            const T c = NOISE ? ch + zc[rh + j] * (cp - ch) : ch;
            const T h = NOISE ? hh + zh[rh + j] * (h_prev[rh + j] - hh) : hh;
            c_out[rh + j] = c;
            h_out[rh + j] = h;
            if (GRAD) {
                const T keep = NOISE ? (T)1 - zh[rh + j] : (T)1;
                k[rg + j] = (i - i * i) * gd;
                k[rg + H + j] = (f - f * f) * cp;
                k[rg + 2 * H + j] = ((T)1 - g * g) * i * d;
                k[rg + 3 * H + j] = (o - o * o) * tc * keep;
                kc[rh + j] = ((T)1 - tc * tc) * o * keep;
            }
            if (HM) hm_next[rh + j] = h * m[rh + j];
            if (HS) hs_next[rh + j] = h * ms[rh + j];
        }
    }
}

template <typename T, int O>
static void bwd_loop(int64_t B, int64_t H, const T *__restrict dh, const T *__restrict dc,
                     const T *__restrict k, const T *__restrict kc, const T *__restrict acts,
                     const T *__restrict zc, T *__restrict dg, const T *__restrict r,
                     T *__restrict dgr, T *__restrict dc_prev)
{
    constexpr bool ZC = O & 1, DGR = O >> 1 & 1;
    const int64_t G = 4 * H;
    for (int64_t b = 0; b < B; b++) {
        const int64_t rg = b * G, rh = b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            const T dhj = dh[rh + j], dcj = dc[rh + j];
            const T z = ZC ? zc[rh + j] : (T)0;
            const T dch = (ZC ? dcj * ((T)1 - z) : dcj) + dhj * kc[rh + j];
            const T gi = k[rg + j] * dch, gf = k[rg + H + j] * dch,
                    gg = k[rg + 2 * H + j] * dch, go = k[rg + 3 * H + j] * dhj;
            dg[rg + j] = gi; dg[rg + H + j] = gf; dg[rg + 2 * H + j] = gg;
            dg[rg + 3 * H + j] = go;
            if (DGR) {
                dgr[rg + j] = gi * r[rg + j]; dgr[rg + H + j] = gf * r[rg + H + j];
                dgr[rg + 2 * H + j] = gg * r[rg + 2 * H + j];
                dgr[rg + 3 * H + j] = go * r[rg + 3 * H + j];
            }
            const T dcp = dch * acts[rg + H + j];
            dc_prev[rh + j] = ZC ? dcp + z * dcj : dcp;
        }
    }
}

template <typename T, typename P, int O>
static void post_loop(int64_t n, const P *__restrict p0, const T *__restrict m,
                      const P *__restrict p1, const T *__restrict ms, const T *__restrict zh,
                      const T *__restrict dh, const T *__restrict dout, T *__restrict dh_prev)
{
    constexpr bool M = O & 1, P1 = O >> 1 & 1, ZH = O >> 2 & 1, DOUT = O >> 3 & 1;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        T v = M ? (T)p0[j] * m[j] : (T)p0[j];
        if (P1) v += (T)p1[j] * ms[j];
        if (ZH) v += zh[j] * dh[j];
        if (DOUT) v += dout[j];
        dh_prev[j] = v;
    }
}

template <typename T, typename P, std::size_t... O>
static auto fwd_table(std::index_sequence<O...>) {
    return std::array<decltype(&fwd_loop<T, P, 0>), sizeof...(O)>{&fwd_loop<T, P, O>...};
}
template <typename T, std::size_t... O>
static auto bwd_table(std::index_sequence<O...>) {
    return std::array<decltype(&bwd_loop<T, 0>), sizeof...(O)>{&bwd_loop<T, O>...};
}
template <typename T, typename P, std::size_t... O>
static auto post_table(std::index_sequence<O...>) {
    return std::array<decltype(&post_loop<T, P, 0>), sizeof...(O)>{&post_loop<T, P, O>...};
}

template <typename T> static T *ptr(const Opt &t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T, typename P>
static void fwd_t(int64_t B, int64_t H, const Tensor &xp, const Tensor &p0, const Opt &p1,
                  const Opt &r, const Tensor &acts, const Tensor &c_prev, const Tensor &h_prev,
                  const Opt &cm, const Opt &zc, const Opt &zh, const Tensor &c_out,
                  const Tensor &h_out, const Opt &k, const Opt &kc, const Opt &m,
                  const Opt &hm_next, const Opt &ms, const Opt &hs_next)
{
    static const auto table = fwd_table<T, P>(std::make_index_sequence<32>{});
    const int opts = p1.has_value() | k.has_value() << 1 | cm.has_value() << 2
                     | hm_next.has_value() << 3 | hs_next.has_value() << 4;
    table[opts](B, H, xp.data_ptr<T>(), p0.data_ptr<P>(), ptr<P>(p1), ptr<T>(r),
                acts.data_ptr<T>(), c_prev.data_ptr<T>(), h_prev.data_ptr<T>(), ptr<T>(cm),
                ptr<T>(zc), ptr<T>(zh), c_out.data_ptr<T>(), h_out.data_ptr<T>(), ptr<T>(k),
                ptr<T>(kc), ptr<T>(m), ptr<T>(hm_next), ptr<T>(ms), ptr<T>(hs_next));
}

void fwd(int64_t B, int64_t H, const Tensor &xp, const Tensor &p0, const Opt &p1,
         const Opt &r, const Tensor &acts, const Tensor &c_prev, const Tensor &h_prev,
         const Opt &cm, const Opt &zc, const Opt &zh, const Tensor &c_out, const Tensor &h_out,
         const Opt &k, const Opt &kc, const Opt &m, const Opt &hm_next, const Opt &ms,
         const Opt &hs_next)
{
    auto f = xp.scalar_type() == at::kDouble ? &fwd_t<double, double>
             : p0.scalar_type() == at::kBFloat16 ? &fwd_t<float, at::BFloat16>
                                                 : &fwd_t<float, float>;
    f(B, H, xp, p0, p1, r, acts, c_prev, h_prev, cm, zc, zh, c_out, h_out, k, kc, m, hm_next,
      ms, hs_next);
}

template <typename T>
static void bwd_t(int64_t B, int64_t H, const Tensor &dh, const Tensor &dc, const Tensor &k,
                  const Tensor &kc, const Tensor &acts, const Opt &zc, const Tensor &dg,
                  const Opt &r, const Opt &dgr, const Tensor &dc_prev)
{
    static const auto table = bwd_table<T>(std::make_index_sequence<4>{});
    table[zc.has_value() | dgr.has_value() << 1](
        B, H, dh.data_ptr<T>(), dc.data_ptr<T>(), k.data_ptr<T>(), kc.data_ptr<T>(),
        acts.data_ptr<T>(), ptr<T>(zc), dg.data_ptr<T>(), ptr<T>(r), ptr<T>(dgr),
        dc_prev.data_ptr<T>());
}

void bwd(int64_t B, int64_t H, const Tensor &dh, const Tensor &dc, const Tensor &k,
         const Tensor &kc, const Tensor &acts, const Opt &zc, const Tensor &dg, const Opt &r,
         const Opt &dgr, const Tensor &dc_prev)
{
    (dh.scalar_type() == at::kDouble ? &bwd_t<double> : &bwd_t<float>)(
        B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev);
}

template <typename T, typename P>
static void post_t(int64_t n, const Tensor &p0, const Opt &m, const Opt &p1, const Opt &ms,
                   const Opt &zh, const Opt &dh, const Opt &dout, const Tensor &dh_prev)
{
    static const auto table = post_table<T, P>(std::make_index_sequence<16>{});
    table[m.has_value() | p1.has_value() << 1 | zh.has_value() << 2 | dout.has_value() << 3](
        n, p0.data_ptr<P>(), ptr<T>(m), ptr<P>(p1), ptr<T>(ms), ptr<T>(zh), ptr<T>(dh),
        ptr<T>(dout), dh_prev.data_ptr<T>());
}

void post(int64_t n, const Tensor &p0, const Opt &m, const Opt &p1, const Opt &ms,
          const Opt &zh, const Opt &dh, const Opt &dout, const Tensor &dh_prev)
{
    auto f = dh_prev.scalar_type() == at::kDouble ? &post_t<double, double>
             : p0.scalar_type() == at::kBFloat16 ? &post_t<float, at::BFloat16>
                                                 : &post_t<float, float>;
    f(n, p0, m, p1, ms, zh, dh, dout, dh_prev);
}

/* torch operators, torch.ops.<name>.fwd etc. (why not pybind11: the module docstring);
   (a!) marks what each function writes. */
TORCH_LIBRARY(TORCH_EXTENSION_NAME, lib) {
    lib.def("fwd(int B, int H, Tensor xp, Tensor p0, Tensor? p1, Tensor? r, Tensor(a!) acts, "
            "Tensor c_prev, Tensor h_prev, Tensor? cm, Tensor? zc, Tensor? zh, Tensor(b!) c_out, "
            "Tensor(c!) h_out, Tensor(d!)? k, Tensor(e!)? kc, Tensor? m, Tensor(f!)? hm_next, "
            "Tensor? ms, Tensor(g!)? hs_next) -> ()", &fwd);
    lib.def("bwd(int B, int H, Tensor dh, Tensor dc, Tensor k, Tensor kc, Tensor acts, "
            "Tensor? zc, Tensor(a!) dg, Tensor? r, Tensor(b!)? dgr, Tensor(c!) dc_prev) -> ()",
            &bwd);
    lib.def("post(int n, Tensor p0, Tensor? m, Tensor? p1, Tensor? ms, Tensor? zh, Tensor? dh, "
            "Tensor? dout, Tensor(a!) dh_prev) -> ()", &post);
}
"""

# -ffp-contract=fast: fused multiply-adds as GNU C does by default (ISO C++ mode would not).
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=fast"]
_LIBS = ["-lmvec", "-lm"]
_STATE_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_lib = None
_tried = False
build_error: Optional[str] = None        # why the module is unavailable (for reports)


def _cpu_id() -> str:
    """The CPU model and flags: ``-march=native`` code is only valid on the CPU it was built on."""
    this = cpuinfo.cpu()
    return f"{this.name}\n{' '.join(sorted(this.flags))}"


def _build():
    from torch.utils.cpp_extension import load_inline
    tag = hashlib.sha256(_cpu_id().encode()).hexdigest()[:12]
    name = f"lm_lstm_cell_{tag}"
    load_inline(name, [_SOURCE], extra_cflags=_FLAGS, extra_ldflags=_LIBS,
                is_python_module=False, no_implicit_headers=True, verbose=False)
    return getattr(torch.ops, name)


def _self_check(lib) -> bool:
    """One step against the formulas in float64, fixed inputs (no RNG)."""
    B, H = 2, 3
    lin = lambda n, a, b: torch.linspace(a, b, n, dtype=torch.float64)  # noqa: E731
    xp = lin(B * 4 * H, -3.0, 3.0).view(B, 4 * H)
    c0, h0 = lin(B * H, -1.0, 1.0).view(B, H), lin(B * H, 0.5, -0.5).view(B, H)
    acts, k = torch.empty(B, 4 * H, dtype=torch.float64), torch.empty(B, 4 * H, dtype=torch.float64)
    c, h, kc = (torch.empty(B, H, dtype=torch.float64) for _ in range(3))
    lib.fwd(B, H, xp, torch.zeros_like(xp), None, None, acts, c0, h0, None, None, None, c, h, k,
            kc, None, None, None, None)
    i, f, g, o = xp.view(B, 4, H).unbind(1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_ref = f * c0 + i * g
    return bool(torch.allclose(c, c_ref, rtol=1e-12, atol=1e-14)
                and torch.allclose(h, o * c_ref.tanh(), rtol=1e-12, atol=1e-14))


def library():
    """The compiled module, built on first use; ``None`` where it cannot be had (see
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
            lib = _build()
            if not _self_check(lib):
                raise RuntimeError("self-check against the torch formulas failed")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure: keep the torch ops
            build_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _lib = None
        _tried = True
    return _lib


def supports(x: Tensor, products: Optional[torch.dtype] = None) -> bool:
    """Whether the compiled cell runs a recurrence whose state is like ``x`` (CPU float32 /
    float64) and whose products come in ``products`` (default: the state dtype; bfloat16
    also serves a float32 state)."""
    products = x.dtype if products is None else products
    ok = products == x.dtype or (x.dtype == torch.float32 and products == torch.bfloat16)
    return (x.device.type == "cpu" and x.dtype in _STATE_DTYPES and ok
            and library() is not None)


class FusedCell:
    """The three step functions, taking tensors (or ``None``).

    The compiled forward takes Semeniuta's and zoneout's tiles as one option, so where only
    some are given the others are stood in for by constant tiles (``cm`` = 1, ``z`` = 0),
    which give the same numbers.
    """

    def __init__(self):
        lib = library()
        if lib is None:
            raise RuntimeError(f"fused LSTM cell unavailable: {build_error}")
        self._lib = lib
        self._standins = {}

    def _standin(self, like: Tensor, value: float) -> Tensor:
        key = (tuple(like.shape), like.dtype, value)
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
        self._lib.fwd(B, H, xp, p0, p1, r, acts, c_prev, h_prev, cm, zc, zh, c_out, h_out, k, kc,
                      m, hm_next, ms, hs_next)

    def bwd(self, B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev):
        if dgr is not None and r is None:
            raise ValueError("FusedCell.bwd: dgr needs r")
        self._lib.bwd(B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev)

    def post(self, n, p0, m, p1, ms, zh, dh, dout, dh_prev):
        if (p1 is not None and ms is None) or (zh is not None and dh is None):
            raise ValueError("FusedCell.post: p1 needs ms, zh needs dh")
        self._lib.post(n, p0, m, p1, ms, zh, dh, dout, dh_prev)
