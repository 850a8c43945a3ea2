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

Kernels, one fixed choice per device, dtype, CPU ISA and weight size (nothing is timed, so
the numbers of a run never depend on which candidate won a race):

* the per-step products ``p0 = h̃ W̄ᵀ`` (and ``p1 = (h̃∘s) ΔŴᵀ``) and the backward ones
  ``δa W̄`` (and ``(δa∘r) ΔŴ``): :mod:`flipout_lstm.nn.products` by its rule, oneDNN's
  matmul primitive on a weight reordered once per call, or ``mm`` / one batched ``bmm`` for
  the flipout pair;
* the pointwise cell, forward (``a = xproj_t + p0 + p1∘r`` through ``h_t``, ``k_t``, and
  the next step's product inputs) and backward (``δĉ``, ``δa_t``, ``δc_{t-1}``, then
  ``δh_{t-1}`` from the backward products): one compiled loop per stage
  (:class:`flipout_lstm.nn.fused_cell.FusedCell`) on the CPU where it builds, torch ops
  (:class:`TorchCell`) elsewhere. Both give the same numbers up to rounding. The compiled
  cell measured 6-8% of a Gal or zoneout training step faster than the torch ops at the
  character and word shapes (AVX-512 EPYC, 1 thread).

Mixed precision (``dtype``, set by the layer under autocast): the products above and the
weight gradients take operands cast to ``dtype`` and return it; the cells widen them as they
read, so ``c_t``, ``h_t``, the gate math, ``k``, ``δa``, ``δh``, ``δc`` and ``δW̄ + e∘δΔŴ``
are all computed and kept in the state dtype (float32).

Memory. The buffers over all steps (gates, backward factors, product inputs, ``δa``) and the
per-call weight copies are plain tensors, a few hundred MB a call at the char shape. On the CPU
glibc would unmap each on free and fault its pages in again on the next call; the trainer keeps
freed memory for reuse instead (:mod:`flipout_lstm.heap`), which serves these buffers and the
model's logits alike (measured in docs/performance.md).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import fused_cell, products

# The kernels of the latest forward call, {"products": ..., "cell": ...}: what a benchmark
# prints next to its numbers.
last_kernels: Dict[str, str] = {}


class TorchCell:
    """The pointwise step as torch ops; the same signatures as
    :class:`flipout_lstm.nn.fused_cell.FusedCell` (``None`` for an absent operand), with (B, H)
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


def _cell(like: Tensor, B: int, H: int, products_dtype: torch.dtype):
    """The pointwise cell: the compiled one where it runs (CPU float32/float64 state, the
    products in that dtype or bfloat16), else torch ops; with its name."""
    if fused_cell.supports(like, products_dtype):
        return fused_cell.FusedCell(), "fused"
    return TorchCell(like, B, H), "torch"


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
    need_grad, dtype)``; call it through :func:`lstm_recurrence`, which sets ``need_grad``.

    Shapes: ``xproj`` (T, B, 4H); ``h0``, ``c0`` (B, H); ``w`` (4H, H) the mean recurrent
    weight W̄ (already shared-perturbed if the caller wants that); ``e`` (4H, H) the flipout
    base perturbation relative to it, ``ΔŴ = W̄ ∘ e``, or ``None``; ``r`` (B, 4H), ``s``
    (B, H) its sign vectors; ``m`` (B, H) Gal's scaled mask or ``None``; ``zc``, ``zh``
    (T, B, H) zoneout weights or ``None``; ``cm`` (T, B, H) or (B, H) Semeniuta's scaled
    mask or ``None``. Gradients flow
    to ``xproj``, ``h0``, ``c0`` and ``w``, the last as ``δW̄ + e ∘ δΔŴ`` (ΔŴ depends on W̄);
    the noise tensors are constants.
    ``need_grad=False`` (no grad mode, nothing requires grad) skips the backward factors.

    ``dtype`` (mixed precision; ``None``: ``xproj``'s dtype): the dtype of the matrix
    products, forward, backward and weight gradients, whose operands are cast to it (the
    weights once per call, ``h̃``/``δa`` per step). Everything else stays in the dtype of
    ``xproj``, ``h0``, ``c0``, ``w`` (float32): the cell state and ``h``, the gate math,
    the backward factors, the ``δh``/``δc`` recursions, the sum ``δW̄ + e∘δΔŴ``; each
    product's result is widened as it is read.
    """

    @staticmethod
    def forward(ctx, xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, e: Optional[Tensor],
                r: Optional[Tensor], s: Optional[Tensor], m: Optional[Tensor],
                zc: Optional[Tensor], zh: Optional[Tensor], cm: Optional[Tensor],
                need_grad: bool = True, dtype: Optional[torch.dtype] = None):
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
        pdt = xproj.dtype if dtype is None else dtype
        cell, cell_name = _cell(xproj, B, H, pdt)
        last_kernels.clear()
        name = products.kernel_name(xproj.device, pdt, step_weight=w.numel())
        last_kernels.update(products=name if pdt == xproj.dtype else f"{name} {pdt}".replace(
            "torch.", ""), cell=cell_name)
        zc_t, zh_t, cm_t = _tiles(zc, T), _tiles(zh, T), _tiles(cm, T)
        acts = new(T, B, G)                              # i, f, g, o after the nonlinearity
        c_bufs = (new(B, H), new(B, H))                  # c_t, alternating
        # The local derivative factors of the backward (module docstring), formed in the
        # forward step: k[t] = (i(1-i)∘d∘g, f(1-f)∘c_{t-1}, (1-g²)∘i∘d, o(1-o)∘tanh ĉ) and
        # k_c[t] = o∘(1-tanh²ĉ), the last two times (1-z^h) under hidden zoneout.
        k = new(T, B, G) if need_grad else None
        k_c = new(T, B, H) if need_grad else None
        if flip:
            # z[:, t] = (h̃_{t-1}, h̃_{t-1}∘s), the inputs of the two products, kept for δW.
            # Without Gal's mask h̃ = h, so the step writes h_t straight into z[0, t+1].
            w_delta = w * e                              # ΔŴ, also for the backward
            prod = products.Pair((w, w_delta), B, pdt)
            z = new(2, T + 1, B, H)
            torch.mul(h0, m, out=z[0, 0]) if m is not None else z[0, 0].copy_(h0)
            torch.mul(h0, ms, out=z[1, 0])
            out = new(T, B, H) if m is not None else z[0, 1:]
            hm = None
        else:
            w_delta = z = None
            prod = products.Linear(w, B, pdt)
            out = new(T, B, H)
            # h̃_t = h_t∘m under Gal's mask, the product input (kept for δW̄ when training).
            hm = new(T + 1, B, H) if m is not None else None
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
            ctx.cell, ctx.pdt = cell_name, pdt
        if flip and m is None:
            out = out.clone()                    # a view of z: hand back a tensor of its own
        return out, out[T - 1].clone(), c.clone()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor):
        # Explicit dtypes throughout: an autocast region around .backward() must not recast.
        with torch.autocast(d_out.device.type, enabled=False):
            return LSTMRecurrence._backward(ctx, d_out, d_hn, d_cn)

    @staticmethod
    def _backward(ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor):
        (acts, k, k_c, out, h0, w, w_delta, e, r, ms, m, zc, zh, hm, zin) = ctx.saved_tensors
        pdt = ctx.pdt
        T, B, G = acts.shape
        H = G // 4
        flip = w_delta is not None
        d_out = d_out.contiguous()
        cell = fused_cell.FusedCell() if ctx.cell == "fused" else TorchCell(acts, B, H)
        zc_t, zh_t = _tiles(zc, T), _tiles(zh, T)

        if flip:
            # (δa_t, δa_t∘r) stacked like the forward's (h̃, h̃∘s), for the products and δW.
            d2 = acts.new_empty(2, T, B, G)
            d_gates = d2[0]
            prod = products.Pair((w.t(), w_delta.t()), B, pdt)
        else:
            d2 = None
            d_gates = acts.new_empty(T, B, G)
            prod = products.Linear(w.t(), B, pdt)
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
                # δW̄ and δΔŴ over all steps: one product each after the loop; then
                # ΔŴ = W̄∘e gives δW = δW̄ + e∘δΔŴ.
                dw0, dw1 = products.tmm_pair(d2.view(2, T * B, G), zin.reshape(2, T * B, H), pdt)
                d_w = dw0.to(w.dtype).addcmul_(dw1, e)
        elif ctx.needs_input_grad[3]:
            if hm is None:
                hm = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
            d_w = products.tmm(d_gates.view(T * B, G), hm.reshape(T * B, H), pdt).to(w.dtype)
        return d_gates, dh, dc, d_w, None, None, None, None, None, None, None, None, None


def lstm_recurrence(xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, e: Optional[Tensor] = None,
                    r: Optional[Tensor] = None, s: Optional[Tensor] = None,
                    m: Optional[Tensor] = None, zc: Optional[Tensor] = None,
                    zh: Optional[Tensor] = None, cm: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None):
    """Run :class:`LSTMRecurrence` (products in ``dtype``, default ``xproj``'s; autocast
    plays no part inside); returns ``out`` (T, B, H), ``h_n``, ``c_n`` (B, H)."""
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xproj, h0, c0, w))
    with torch.autocast(xproj.device.type, enabled=False):
        return LSTMRecurrence.apply(xproj, h0, c0, w, e, r, s, m, zc, zh, cm, need_grad, dtype)
