"""The custom LSTM recurrence for the noise that the fused kernels cannot express.

One layer, time-major, with a hand-written backward. The input projection of all steps
(``x_t W_ihᵀ + b``, possibly with input-weight flipout) is computed outside, as one matrix
product under autograd, and arrives as ``xproj``; inside, each step does only the recurrent
product(s) and the elementwise cell::

    h̃      = h_{t-1} ∘ m                                  (Gal; m = 1 without it)
    a_t    = xproj_t + h̃ W̄ᵀ + ((h̃ ∘ s) ΔŴᵀ) ∘ r            (flipout term only with ΔŴ)
    i, f, o = σ(a_i), σ(a_f), σ(a_o);   g = tanh(a_g)      (gate order i, f, g, o)
    ĉ      = f ∘ c_{t-1} + i ∘ (d_t ∘ g)                   (Semeniuta; d = 1 without it)
    ĥ      = o ∘ tanh(ĉ)
    c_t    = z^c_t ∘ c_{t-1} + (1 - z^c_t) ∘ ĉ              (zoneout; z = 0 without it)
    h_t    = z^h_t ∘ h_{t-1} + (1 - z^h_t) ∘ ĥ

The zoneout "masks" may be any real tensor: eval passes the constant probability, which
gives the expectation ``p·old + (1-p)·new``.

Backward (row convention; ``δa_t`` the gate-preactivation gradient)::

    δĥ = (1 - z^h) ∘ δh_t,             δĉ = (1 - z^c) ∘ δc_t + δĥ ∘ o ∘ (1 - tanh²ĉ)
    δa_o = δĥ ∘ tanh ĉ ∘ o(1-o),        δa_i = δĉ ∘ (d∘g) ∘ i(1-i)
    δa_f = δĉ ∘ c_{t-1} ∘ f(1-f),       δa_g = δĉ ∘ i ∘ d ∘ (1-g²)
    δc_{t-1} = δĉ ∘ f + z^c ∘ δc_t
    δh_{t-1} = (δa_t W̄) ∘ m + ((δa_t ∘ r) ΔŴ) ∘ (m ∘ s) + z^h ∘ δh_t + δout_{t-1}
    δW̄  = Σ_t δa_tᵀ h̃_t           = (stacked δa)ᵀ (stacked h̃)        one product after the loop
    δΔŴ = Σ_t (δa_t ∘ r)ᵀ (h̃_t ∘ s)                                   likewise
    δW  = δW̄ + e ∘ δΔŴ             (ΔŴ = W̄ ∘ e: e = ξ for DropConnect, σε for Gaussian)
    δxproj_t = δa_t

Every factor of the δa_t lines that does not depend on the incoming gradient is formed in
the forward step (``k``, ``k_c``), so the backward loop itself is the recurrent product(s)
and a handful of elementwise ops per step.

Kernels. A step is three stages, each with candidates that give the same numbers and are
chosen by timing them where they run (:mod:`lm.nn.kernels`, once per device, dtype, shape,
variant and thread count):

* the forward product(s) ``p0 = h̃ W̄ᵀ`` (and ``p1 = (h̃∘s) ΔŴᵀ``): MKL packed weights,
  oneDNN's matmul primitive on a weight reordered once per call, plain ``mm``, or for the
  flipout pair one batched ``bmm``;
* the pointwise cell, forward (``a = xproj_t + p0 + p1∘r`` through ``h_t``, ``k_t``, and
  the next step's product inputs) and backward (``δĉ``, ``δa_t``, ``δc_{t-1}``, then
  ``δh_{t-1}`` from the backward products): torch ops (:class:`TorchCell`) or one compiled
  loop per stage (:class:`lm.nn.fused_cell.FusedCell`);
* the backward product(s) ``δa W̄`` (and ``(δa∘r) ΔŴ``): ``mm``, ``bmm``, packed or
  oneDNN ``W̄ᵀ``.

At the character shape (batch 32, 1000 → 4000) oneDNN's matmul ran the forward product
about 1.6x faster than MKL's ``mm`` on an AVX2 EPYC: the same kernel family that makes
``torch.nn.LSTM``'s fused oneDNN cell fast, and flipout does twice its products.

Memory. The buffers over all steps (gates, backward factors, product inputs, ``δa``) and
the per-call weight copies come from :mod:`lm.nn.workspace`, which keeps them between calls:
on the CPU, freeing and re-allocating them made every call fault a few hundred MB of pages
in again (at the char shape 93k faults a flipout call, 26k with the pool).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import fused_cell, kernels, workspace

_packed_ok: Optional[bool] = None
_onednn_ok: Optional[bool] = None

# The kernels of the latest forward call, {"cell": ..., "fwd": ..., "bwd": ...}: what a
# benchmark prints next to its numbers.
last_kernels: Dict[str, str] = {}


def _runs_here(linear) -> bool:
    """Whether a weight-preparing product class (``linear(w, batch)(h) = h wᵀ``, built on a
    private op) runs and agrees with ``mm``: probed on fixed values, not ``randn``, so the
    probe does not consume the global RNG."""
    try:
        w = torch.linspace(-1.0, 1.0, 32).reshape(8, 4)
        h = torch.linspace(0.5, -0.5, 12).reshape(3, 4)
        return bool(torch.allclose(linear(w, 3)(h), h @ w.t(), atol=1e-5))
    except Exception:  # noqa: BLE001 - op missing from this build, or changed: fall back
        return False


def _packed_available(x: Tensor) -> bool:
    """Whether MKL's packed-weight product ``torch.ops.mkl._mkl_linear`` runs here: float32
    on CPU in MKL builds, probed once. Whether it is *faster* is measured per shape by
    :mod:`lm.nn.kernels`."""
    global _packed_ok
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if _packed_ok is None:
        _packed_ok = _runs_here(_PackedLinear)
    return _packed_ok


def _onednn_available(x: Tensor) -> bool:
    """Whether oneDNN's matmul primitive (``torch.ops.mkldnn._linear_pointwise`` on a weight
    from ``_reorder_linear_weight``, the ops torch's own CPU compiler emits for ``linear``)
    runs here: float32 on CPU with oneDNN, probed once."""
    global _onednn_ok
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if _onednn_ok is None:
        _onednn_ok = _runs_here(_OneDNNLinear)
    return _onednn_ok


def _contiguous(w: Tensor) -> Tensor:
    """``w`` itself if contiguous, else a contiguous copy in a pooled buffer (for ``W̄ᵀ``)."""
    return w if w.is_contiguous() else workspace.empty(w.shape, w).copy_(w)


class _OneDNNLinear:
    """``h ↦ h Wᵀ`` by oneDNN's matmul, ``W`` reordered once for batch ``B`` (like packing,
    a copy of ``W`` per call of the recurrence)."""

    def __init__(self, w: Tensor, batch: int):
        self.w = torch.ops.mkldnn._reorder_linear_weight(_contiguous(w), batch)

    def __call__(self, h: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(h, self.w, None, "none", [], "")


class _PackedLinear:
    """``h ↦ h Wᵀ`` with ``W`` packed once for batch ``B`` (packing costs ~2 steps)."""

    def __init__(self, w: Tensor, batch: int):
        self.w = _contiguous(w)
        self.batch = batch
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, batch)

    def __call__(self, h: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return torch.ops.mkl._mkl_linear(h, self.packed, self.w, None, self.batch)


class _Linear:
    """``h ↦ h Wᵀ`` with plain ``mm`` against a contiguous ``Wᵀ`` (faster than a transposed
    view), into ``out``."""

    def __init__(self, w: Tensor, batch: int):
        self.wt = _contiguous(w.t())

    def __call__(self, h: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return torch.mm(h, self.wt, out=out)


_LINEARS = {"packed": _PackedLinear, "onednn": _OneDNNLinear}  # weight prepared per call


class _Product:
    """One per-step product ``x ↦ x Mᵀ`` (``M`` (N, K)) by the chosen kernel."""

    def __init__(self, kind: str, m: Tensor, batch: int):
        self.fn = _LINEARS.get(kind, _Linear)(m, batch)
        self.out = None if kind in _LINEARS else m.new_empty(batch, m.size(0))

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, self.out)


class _Pair:
    """Two per-step products ``(x0 M0ᵀ, x1 M1ᵀ)`` from a stacked ``x`` (2, B, K) and
    ``m = (M0, M1)``, each (N, K) (a (2, N, K) tensor also does): two packed or oneDNN
    products, one batched ``bmm``, or two plain ``mm``."""

    def __init__(self, kind: str, m, batch: int):
        self.kind = kind
        if kind in _LINEARS:
            lin = _LINEARS[kind]
            self.lins = (lin(m[0], batch), lin(m[1], batch))
        else:
            N, K = m[0].shape                                   # one copy, (2, K, N)
            self.mt = torch.stack([m[0].t(), m[1].t()], out=workspace.empty((2, K, N), m[0]))
            self.out = m[0].new_empty(2, batch, N)

    def __call__(self, x: Tensor):
        if self.kind in _LINEARS:
            return self.lins[0](x[0]), self.lins[1](x[1])
        if self.kind == "bmm":
            torch.bmm(x, self.mt, out=self.out)
        else:
            torch.mm(x[0], self.mt[0], out=self.out[0])
            torch.mm(x[1], self.mt[1], out=self.out[1])
        return self.out[0], self.out[1]


class TorchCell:
    """The pointwise step as torch ops; the same signatures as
    :class:`lm.nn.fused_cell.FusedCell` (``None`` for an absent operand), with (B, H)
    scratch tiles of its own."""

    def __init__(self, like: Tensor, B: int, H: int):
        new = like.new_empty
        self.gd, self.ch, self.tc, self.hh, self.one_minus = (new(B, H) for _ in range(5))
        self.dch = new(B, H)
        self.ones = torch.ones(B, H, dtype=like.dtype, device=like.device)

    def fwd(self, B, H, xp, p0, p1, r, a, c_prev, h_prev, cm, zc, zh, c_out, h_out, k, kc,
            m, hm_next, ms, hs_next):
        torch.add(xp, p0, out=a)
        if p1 is not None:
            a.addcmul_(p1, r)
        a[:, :2 * H].sigmoid_()
        a[:, 2 * H:3 * H].tanh_()
        a[:, 3 * H:].sigmoid_()
        i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        gd = torch.mul(g, cm, out=self.gd) if cm is not None else g
        ch = torch.mul(f, c_prev, out=self.ch if zc is not None else c_out)
        ch.addcmul_(i, gd)
        tc = torch.tanh(ch, out=self.tc)
        if zh is not None:
            torch.lerp(torch.mul(o, tc, out=self.hh), h_prev, zh, out=h_out)
        else:
            torch.mul(o, tc, out=h_out)
        if k is not None:
            kv = k.view(B, 4, H)
            torch.addcmul(i, i, i, value=-1, out=kv[:, 0]).mul_(gd)
            torch.addcmul(f, f, f, value=-1, out=kv[:, 1]).mul_(c_prev)
            torch.addcmul(self.ones, g, g, value=-1, out=kv[:, 2]).mul_(i)
            if cm is not None:
                kv[:, 2].mul_(cm)
            torch.addcmul(o, o, o, value=-1, out=kv[:, 3]).mul_(tc)
            torch.addcmul(self.ones, tc, tc, value=-1, out=kc).mul_(o)
            if zh is not None:
                keep = torch.sub(self.ones, zh, out=self.one_minus)
                kv[:, 3].mul_(keep)
                kc.mul_(keep)
        if zc is not None:
            torch.lerp(ch, c_prev, zc, out=c_out)
        if hm_next is not None:
            torch.mul(h_out, m, out=hm_next)
        if hs_next is not None:
            torch.mul(h_out, ms, out=hs_next)

    def bwd(self, B, H, dh, dc, k, kc, acts, zc, dg, r, dgr, dc_prev):
        if zc is not None:
            keep = torch.sub(self.ones, zc, out=self.one_minus)
            torch.mul(dc, keep, out=self.dch).addcmul_(dh, kc)
        else:
            torch.addcmul(dc, dh, kc, out=self.dch)
        kv, dgv = k.view(B, 4, H), dg.view(B, 4, H)
        torch.mul(kv[:, :3], self.dch.unsqueeze(1), out=dgv[:, :3])
        torch.mul(kv[:, 3], dh, out=dgv[:, 3])
        torch.mul(self.dch, acts[:, H:2 * H], out=dc_prev)
        if zc is not None:
            dc_prev.addcmul_(dc, zc)
        if dgr is not None:
            torch.mul(dg, r, out=dgr)

    def post(self, n, p0, m, p1, ms, zh, dh, dout, dh_prev):
        if m is not None:
            torch.mul(p0, m, out=dh_prev)
        else:
            dh_prev.copy_(p0)
        if p1 is not None:
            dh_prev.addcmul_(p1, ms)
        if zh is not None:
            dh_prev.addcmul_(zh, dh)
        if dout is not None:
            dh_prev.add_(dout)


# ---------------------------------------------------------------------- kernel choice
def _gen_like(like: Tensor, *shape: int, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    """Synthetic timing input from a private generator (the global RNG stays untouched)."""
    x = torch.randn(*shape, generator=gen, dtype=like.dtype, device="cpu") * scale
    return x.to(like.device)


def _device_key(x: Tensor) -> tuple:
    return (x.device.type, x.device.index, str(x.dtype).replace("torch.", ""))


def _choose_products(like: Tensor, B: int, H: int, flip: bool, need_grad: bool) -> Dict[str, str]:
    """The product kernels for this call: ``{"fwd": ..., "bwd": ...}``."""
    G = 4 * H
    unavailable = set()
    if not (_packed_available(like) and B > 1):
        unavailable.add("packed")
    if not _onednn_available(like):
        unavailable.add("onednn")
    key = _device_key(like) + (B, H)

    def candidates(op):
        return [n for n in kernels.OPS[op] if n not in unavailable]

    single, pair = candidates("fwd_product"), candidates("fwd_pair")

    def runners(kinds, op_pair: bool, transpose: bool):
        def make():
            gen = torch.Generator().manual_seed(0)
            shape = (G, H) if not transpose else (H, G)
            m = _gen_like(like, *(((2,) if op_pair else ()) + shape), gen=gen, scale=0.03)
            x = _gen_like(like, *(((2,) if op_pair else ()) + (B, shape[1])), gen=gen)
            cls = _Pair if op_pair else _Product
            return {kind: (lambda p=cls(kind, m, B): p(x)) for kind in kinds}
        return make

    out = {}
    if flip:
        out["fwd"] = kernels.choose("fwd_pair", key, pair, runners(pair, True, False))
        if need_grad:
            bp = candidates("bwd_pair")
            out["bwd"] = kernels.choose("bwd_pair", key, bp, runners(bp, True, True))
    else:
        out["fwd"] = kernels.choose("fwd_product", key, single, runners(single, False, False))
        if need_grad:
            bs = candidates("bwd_product")
            out["bwd"] = kernels.choose("bwd_product", key, bs, runners(bs, False, True))
    return out


def _choose_cell(like: Tensor, B: int, H: int, opts: tuple):
    """The pointwise cell for this call: a :class:`FusedCell` or a :class:`TorchCell`.

    ``opts`` = (flip, gal, zc, zh, cm, need_grad) as booleans: the variant, part of the key.
    """
    avail = [n for n in kernels.OPS["cell"] if n != "fused" or fused_cell.supports(like)]

    def make():
        gen = torch.Generator().manual_seed(0)
        flip, gal, has_zc, has_zh, has_cm, need_grad = opts
        G = 4 * H
        g = lambda *s, scale=1.0: _gen_like(like, *s, gen=gen, scale=scale)  # noqa: E731
        xp, p0, p1 = g(B, G), g(B, G), g(B, G)
        r = torch.sign(g(B, G))
        c0, h0, mask = g(B, H), g(B, H), (g(B, H) > 0).to(like.dtype) * 2
        zc = (g(B, H) > 0).to(like.dtype) if has_zc else None
        zh = (g(B, H) > 1).to(like.dtype) if has_zh else None
        cm = mask if has_cm else None
        m = mask if gal else None
        acts, k = like.new_empty(B, G), like.new_empty(B, G)
        dg, dgr = like.new_empty(B, G), like.new_empty(B, G)
        c1, h1, kc, hn, hs, dc_prev, dh_prev = (like.new_empty(B, H) for _ in range(7))
        # Without Gal's mask the fused forward writes h_t straight into the next product
        # input; flipout also forms h_t∘s there.
        hm_next = hn if gal else None
        hs_next = hs if flip else None
        ms = mask if flip else None

        def run(cell):
            cell.fwd(B, H, xp, p0, p1 if flip else None, r if flip else None, acts, c0, h0, cm,
                     zc, zh, c1, h1, k if need_grad else None, kc if need_grad else None, m,
                     hm_next, ms, hs_next)
            if need_grad:
                cell.bwd(B, H, h1, c1, k, kc, acts, zc, dg, r if flip else None,
                         dgr if flip else None, dc_prev)
                cell.post(B * H, acts[:, :H], m, acts[:, H:2 * H] if flip else None, ms, zh,
                          h1, h0, dh_prev)
        return {"fused": (lambda c=fused_cell.FusedCell(like.dtype): run(c)) if "fused" in avail
                else None, "torch": (lambda c=TorchCell(like, B, H): run(c))}

    def make_avail():
        return {n: f for n, f in make().items() if n in avail}

    name = kernels.choose("cell", _device_key(like) + (B, H) + tuple(map(bool, opts)), avail,
                          make_avail)
    return fused_cell.FusedCell(like.dtype) if name == "fused" else TorchCell(like, B, H), name


def _tiles(x: Optional[Tensor], T: int) -> List[Optional[Tensor]]:
    """Per-step contiguous (B, H) tiles of a (T, B, H) or (B, H) tensor (``None``: absent).

    A constant over time (zoneout's expectation, an expanded view; or a per-sequence mask)
    becomes one tile shared by every step."""
    if x is None:
        return [None] * T
    if x.dim() == 2:
        tile = x.contiguous()
        return [tile] * T
    if x.stride(0) == 0:
        tile = x[0].contiguous()
        return [tile] * T
    x = x.contiguous()
    return list(x.unbind(0))


class LSTMRecurrence(torch.autograd.Function):
    """``(out, h_n, c_n) = LSTMRecurrence.apply(xproj, h0, c0, w, e, r, s, m, zc, zh, cm,
    need_grad)``; call it through :func:`lstm_recurrence`, which sets ``need_grad``.

    Shapes: ``xproj`` (T, B, 4H); ``h0``, ``c0`` (B, H); ``w`` (4H, H) the mean recurrent
    weight W̄ (already shared-perturbed if the caller wants that); ``e`` (4H, H) the flipout
    base perturbation relative to it, ``ΔŴ = W̄ ∘ e``, or ``None``; ``r`` (B, 4H), ``s``
    (B, H) its sign vectors; ``m`` (B, H) Gal's scaled mask or ``None``; ``zc``, ``zh``
    (T, B, H) zoneout weights or ``None``; ``cm`` (T, B, H) or (B, H) Semeniuta's scaled
    mask or ``None``. Gradients flow
    to ``xproj``, ``h0``, ``c0`` and ``w``, the last as ``δW̄ + e ∘ δΔŴ`` (ΔŴ depends on W̄);
    the noise tensors are constants.
    ``need_grad=False`` (no grad mode, nothing requires grad) skips the backward factors.
    """

    @staticmethod
    def forward(ctx, xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, e: Optional[Tensor],
                r: Optional[Tensor], s: Optional[Tensor], m: Optional[Tensor],
                zc: Optional[Tensor], zh: Optional[Tensor], cm: Optional[Tensor],
                need_grad: bool = True):
        T, B, G = xproj.shape
        H = G // 4
        xproj = xproj.contiguous()
        h0, c0, w = h0.contiguous(), c0.contiguous(), w.contiguous()
        flip = e is not None
        r = r.contiguous() if flip else None
        m = m.contiguous() if m is not None else None
        # Under Gal's mask the flipout product sees h̃∘s = h∘(m∘s): one multiply, not two.
        ms = ((s * m if m is not None else s).contiguous()) if flip else None
        new = xproj.new_empty
        big = lambda *shape: workspace.empty(shape, xproj)  # noqa: E731 - kept between calls
        opts = (flip, m is not None, zc is not None, zh is not None, cm is not None, need_grad)
        cell, cell_name = _choose_cell(xproj, B, H, opts)
        prods = _choose_products(xproj, B, H, flip, need_grad)
        last_kernels.clear()
        last_kernels.update(cell=cell_name, **prods)
        zc_t, zh_t, cm_t = _tiles(zc, T), _tiles(zh, T), _tiles(cm, T)
        acts = big(T, B, G)                              # i, f, g, o after the nonlinearity
        c_bufs = (new(B, H), new(B, H))                  # c_t, alternating
        # The local derivative factors of the backward (module docstring), formed in the
        # forward step: k[t] = (i(1-i)∘d∘g, f(1-f)∘c_{t-1}, (1-g²)∘i∘d, o(1-o)∘tanh ĉ) and
        # k_c[t] = o∘(1-tanh²ĉ), the last two times (1-z^h) under hidden zoneout.
        k = big(T, B, G) if need_grad else None
        k_c = big(T, B, H) if need_grad else None
        if flip:
            # z[:, t] = (h̃_{t-1}, h̃_{t-1}∘s), the inputs of the two products, kept for δW.
            # Without Gal's mask h̃ = h, so the step writes h_t straight into z[0, t+1].
            w_delta = torch.mul(w, e, out=big(*w.shape))  # ΔŴ, also for the backward
            prod = _Pair(prods["fwd"], (w, w_delta), B)
            z = big(2, T + 1, B, H)
            torch.mul(h0, m, out=z[0, 0]) if m is not None else z[0, 0].copy_(h0)
            torch.mul(h0, ms, out=z[1, 0])
            out = big(T, B, H) if m is not None else z[0, 1:]
            hm = None
        else:
            w_delta = z = None
            prod = _Product(prods["fwd"], w, B)
            out = big(T, B, H)
            # h̃_t = h_t∘m under Gal's mask, the product input (kept for δW̄ when training).
            hm = big(T + 1, B, H) if m is not None else None
            if m is not None:
                torch.mul(h0, m, out=hm[0])

        h, c = h0, c0
        for t in range(T):
            if flip:
                p0, p1 = prod(z[:, t])
                hm_next, hs_next = (z[0, t + 1] if m is not None else None), z[1, t + 1]
            else:
                p0, p1 = prod(hm[t] if m is not None else h), None
                hm_next, hs_next = (hm[t + 1] if m is not None else None), None
            c_next = c_bufs[t % 2]
            cell.fwd(B, H, xproj[t], p0, p1, r, acts[t], c, h, cm_t[t], zc_t[t], zh_t[t],
                     c_next, out[t], k[t] if need_grad else None,
                     k_c[t] if need_grad else None, m, hm_next, ms, hs_next)
            h, c = out[t], c_next

        if need_grad:
            zin = z[:, :T] if flip else None
            hm_in = hm[:T] if hm is not None else None
            ctx.save_for_backward(acts, k, k_c, out, h0, w, w_delta, e, r, ms, m, zc, zh, hm_in,
                                  zin)
            ctx.kernels = (cell_name, prods.get("bwd"))
        if flip and m is None:
            out = big(T, B, H).copy_(out)        # a view of z: hand back a tensor of its own
        return out, out[T - 1].clone(), c.clone()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor):
        (acts, k, k_c, out, h0, w, w_delta, e, r, ms, m, zc, zh, hm, zin) = ctx.saved_tensors
        cell_name, bwd_kind = ctx.kernels
        T, B, G = acts.shape
        H = G // 4
        flip = w_delta is not None
        d_out = d_out.contiguous()
        cell = fused_cell.FusedCell(acts.dtype) if cell_name == "fused" else TorchCell(acts, B, H)
        zc_t, zh_t = _tiles(zc, T), _tiles(zh, T)

        if flip:
            # (δa_t, δa_t∘r) stacked like the forward's (h̃, h̃∘s), for the products and δW.
            d2 = workspace.empty((2, T, B, G), acts)
            d_gates = d2[0]
            prod = _Pair(bwd_kind, (w.t(), w_delta.t()), B)
        else:
            d2 = None
            d_gates = workspace.empty((T, B, G), acts)
            prod = _Product(bwd_kind, w.t(), B)
        dh = d_hn + d_out[T - 1]
        dc = d_cn.contiguous().clone()
        dh_prev = acts.new_empty(B, H)
        dc_prev = acts.new_empty(B, H)
        for t in range(T - 1, -1, -1):
            cell.bwd(B, H, dh, dc, k[t], k_c[t], acts[t], zc_t[t], d_gates[t],
                     r, d2[1, t] if flip else None, dc_prev)
            if flip:
                p0, p1 = prod(d2[:, t])
            else:
                p0, p1 = prod(d_gates[t]), None
            cell.post(B * H, p0, m, p1, ms, zh_t[t], dh, d_out[t - 1] if t > 0 else None,
                      dh_prev)
            dh, dh_prev = dh_prev, dh
            dc, dc_prev = dc_prev, dc

        d_w = None
        if flip:
            if ctx.needs_input_grad[3]:
                # δW̄ and δΔŴ over all steps: one batched product after the loop; then
                # ΔŴ = W̄∘e gives δW = δW̄ + e∘δΔŴ.
                dw2 = torch.bmm(d2.view(2, T * B, G).transpose(1, 2), zin.reshape(2, T * B, H))
                d_w = dw2[0].addcmul_(dw2[1], e)
        elif ctx.needs_input_grad[3]:
            if hm is None:
                hm = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
            d_w = d_gates.view(T * B, G).t().mm(hm.reshape(T * B, H))
        return d_gates, dh, dc, d_w, None, None, None, None, None, None, None, None


def lstm_recurrence(xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, e: Optional[Tensor] = None,
                    r: Optional[Tensor] = None, s: Optional[Tensor] = None,
                    m: Optional[Tensor] = None, zc: Optional[Tensor] = None,
                    zh: Optional[Tensor] = None, cm: Optional[Tensor] = None):
    """Run :class:`LSTMRecurrence`; returns ``out`` (T, B, H), ``h_n``, ``c_n`` (B, H)."""
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xproj, h0, c0, w))
    return LSTMRecurrence.apply(xproj, h0, c0, w, e, r, s, m, zc, zh, cm, need_grad)
