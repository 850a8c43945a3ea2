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
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


# Below this many multiply-adds per step a pair of plain products beats one batched
# product: bmm's split across threads costs more than it saves on tiny matrices (and
# stalls badly when the cores are shared).
_BATCHED_PAIR_MIN_MACS = 1 << 20


def _pair_mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out[k] = a[k] @ b[k]`` for k = 0, 1."""
    if a.size(1) * a.size(2) * b.size(2) >= _BATCHED_PAIR_MIN_MACS:
        return torch.bmm(a, b, out=out)
    torch.mm(a[0], b[0], out=out[0])
    torch.mm(a[1], b[1], out=out[1])
    return out


_packed_ok: Optional[bool] = None


def _packed_available(x: Tensor) -> bool:
    """Whether MKL's packed-weight product can serve the per-step forward products.

    On CPU (float32, MKL build) the product ``h Wᵀ`` against a weight packed once per call
    runs ~30% faster than plain ``mm`` for the small batch of a recurrence; packing a
    (4H, H) matrix costs about two steps' worth. Anything else uses ``mm``/``bmm``.
    """
    global _packed_ok
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if _packed_ok is None:
        try:
            # Fixed values, not randn: the probe must not consume the global RNG, or a
            # resumed run would draw different noise from an uninterrupted one.
            w = torch.linspace(-1.0, 1.0, 32).reshape(8, 4)
            h = torch.linspace(0.5, -0.5, 12).reshape(3, 4)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 3)
            y = torch.ops.mkl._mkl_linear(h, packed, w, None, 3)
            _packed_ok = bool(torch.allclose(y, h @ w.t(), atol=1e-5))
        except Exception:  # noqa: BLE001 - no MKL, or the private op changed: fall back
            _packed_ok = False
    return _packed_ok


class _PackedLinear:
    """``h ↦ h Wᵀ`` with ``W`` packed once for batch ``B`` (see :func:`_packed_available`)."""

    def __init__(self, w: Tensor, batch: int):
        self.w = w.contiguous()
        self.batch = batch
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, batch)

    def __call__(self, h: Tensor) -> Tensor:
        return torch.ops.mkl._mkl_linear(h, self.packed, self.w, None, self.batch)


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
        flip = e is not None
        # Under Gal's mask the flipout product sees h̃∘s = h∘(m∘s): one multiply, not two.
        ms = (s * m if m is not None else s) if flip else None
        cm_step = cm is not None and cm.dim() == 3
        new = xproj.new_empty

        acts = torch.empty_like(xproj)                   # i, f, g, o after the nonlinearity
        c_bufs = (new(B, H), new(B, H))                  # c_t, alternating
        tanh_c = new(B, H)
        cnew = new(B, H) if zc is not None else None
        hnew = new(B, H) if zh is not None else None
        gd = new(B, H) if cm is not None else None
        if need_grad:
            # The local derivative factors of the backward (module docstring), formed here
            # per step on cache-hot (B, H) tiles rather than over all steps afterwards:
            # k[t] = (i(1-i)∘d∘g, f(1-f)∘c_{t-1}, (1-g²)∘i∘d, o(1-o)∘tanh ĉ) and
            # k_c[t] = o∘(1-tanh²ĉ), the last two times (1-z^h) under hidden zoneout.
            k = new(T, B, 4, H)
            k_c = new(T, B, H)
            ones = torch.ones_like(tanh_c)
            keep_h = 1 - zh if zh is not None else None
        packed = _packed_available(xproj) and B > 1
        if flip:
            # Both recurrent products as one batched product: z[:, t] = (h̃_{t-1}, h̃_{t-1}∘s)
            # against the stacked (W̄, ΔŴ). On CPU a batch of two runs ~15% faster than two
            # separate products (each thread streams its own matrix); two packed products
            # are faster still. Without Gal's mask h̃ = h, so the step writes h_t straight
            # into z[0, t+1].
            w2 = xproj.new_empty(2, G, H)                # (W̄, ΔŴ), also for the backward
            w2[0].copy_(w)
            torch.mul(w, e, out=w2[1])
            if packed:
                lin0, lin1 = _PackedLinear(w2[0], B), _PackedLinear(w2[1], B)
            else:
                # A contiguous (H, 4H) operand is ~20% faster than a transposed view.
                w2t = w2.transpose(1, 2).contiguous()
                prod = new(2, B, G)
            z = new(2, T + 1, B, H)
            torch.mul(h0, m, out=z[0, 0]) if m is not None else z[0, 0].copy_(h0)
            out = new(T, B, H) if m is not None else z[0, 1:]
            hm = None
        else:
            w2 = z = None
            out = new(T, B, H)
            hm = new(T, B, H) if (m is not None and need_grad) else None   # h̃_t, for δW̄
            hin_buf = new(B, H) if m is not None else None
            if packed:
                lin0 = _PackedLinear(w, B)
            else:
                wt = w.t()

        h = h0
        c = c0
        for t in range(T):
            a = acts[t]
            if flip:
                torch.mul(h, ms, out=z[1, t])
                if packed:
                    torch.add(xproj[t], lin0(z[0, t]), out=a).addcmul_(lin1(z[1, t]), r)
                else:
                    _pair_mm(z[:, t], w2t, out=prod)
                    torch.addcmul(prod[0], prod[1], r, out=a).add_(xproj[t])
            else:
                hin = torch.mul(h, m, out=hm[t] if hm is not None else hin_buf) \
                    if m is not None else h
                if packed:
                    torch.add(xproj[t], lin0(hin), out=a)
                else:
                    torch.addmm(xproj[t], hin, wt, out=a)
            a[:, :2 * H].sigmoid_()
            a[:, 2 * H:3 * H].tanh_()
            a[:, 3 * H:].sigmoid_()
            i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            cm_t = (cm[t] if cm_step else cm) if cm is not None else None
            if cm is not None:
                g_eff = torch.mul(g, cm_t, out=gd)
            else:
                g_eff = g
            c_next = c_bufs[t % 2]
            c_hat = torch.mul(f, c, out=cnew if zc is not None else c_next)
            c_hat.addcmul_(i, g_eff)
            torch.tanh(c_hat, out=tanh_c)
            if zh is not None:
                torch.lerp(torch.mul(o, tanh_c, out=hnew), h, zh[t], out=out[t])
            else:
                torch.mul(o, tanh_c, out=out[t])
            if need_grad:
                kt = k[t]
                torch.addcmul(i, i, i, value=-1, out=kt[:, 0]).mul_(g_eff)
                torch.addcmul(f, f, f, value=-1, out=kt[:, 1]).mul_(c)
                torch.addcmul(ones, g, g, value=-1, out=kt[:, 2]).mul_(i)
                if cm is not None:
                    kt[:, 2].mul_(cm_t)
                torch.addcmul(o, o, o, value=-1, out=kt[:, 3]).mul_(tanh_c)
                torch.addcmul(ones, tanh_c, tanh_c, value=-1, out=k_c[t]).mul_(o)
                if zh is not None:
                    kt[:, 3].mul_(keep_h[t])
                    k_c[t].mul_(keep_h[t])
            if zc is not None:
                torch.lerp(c_hat, c, zc[t], out=c_next)
            h = out[t]
            c = c_next
            if flip and m is not None:
                torch.mul(h, m, out=z[0, t + 1])

        if need_grad:
            zin = z[:, :T] if flip else None
            ctx.save_for_backward(acts, k, k_c, out, h0, w, w2, e, r, ms, m, zc, zh, hm, zin)
        if flip and m is None:
            out = out.clone()        # a view of z: hand back a tensor of its own
        return out, out[T - 1].clone(), c.clone()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor):
        (acts, k, k_c, out, h0, w, w2, e, r, ms, m, zc, zh, hm, zin) = ctx.saved_tensors
        T, B, G = acts.shape
        H = G // 4
        flip = w2 is not None
        d_out = d_out.contiguous()
        f = acts[..., H:2 * H]
        keep_c = 1 - zc if zc is not None else None

        if flip:
            # (δa_t, δa_t∘r) stacked like the forward's (h̃, h̃∘s), for batched products.
            d2 = acts.new_empty(2, T, B, G)
            d_gates = d2[0]
            prod = acts.new_empty(2, B, H)
        else:
            d_gates = acts.new_empty(T, B, G)
        dgv = d_gates.view(T, B, 4, H)
        dh = d_hn + d_out[T - 1]
        dc = d_cn.clone()
        dc_hat = acts.new_empty(B, H)
        dh_prev = acts.new_empty(B, H)
        dc_prev = acts.new_empty(B, H)
        plain = m is None and not flip and zh is None
        for t in range(T - 1, -1, -1):
            if zc is not None:
                torch.mul(dc, keep_c[t], out=dc_hat).addcmul_(dh, k_c[t])
            else:
                torch.addcmul(dc, dh, k_c[t], out=dc_hat)
            torch.mul(k[t, :, :3], dc_hat.unsqueeze(1), out=dgv[t, :, :3])
            torch.mul(k[t, :, 3], dh, out=dgv[t, :, 3])
            torch.mul(dc_hat, f[t], out=dc_prev)
            if zc is not None:
                dc_prev.addcmul_(dc, zc[t])
            dgt = d_gates[t]
            if plain:
                if t > 0:
                    torch.addmm(d_out[t - 1], dgt, w, out=dh_prev)
                else:
                    torch.mm(dgt, w, out=dh_prev)
            else:
                if flip:
                    torch.mul(dgt, r, out=d2[1, t])
                    _pair_mm(d2[:, t], w2, out=prod)
                    if m is not None:
                        torch.mul(prod[0], m, out=dh_prev).addcmul_(prod[1], ms)
                    else:
                        torch.addcmul(prod[0], prod[1], ms, out=dh_prev)
                else:
                    torch.mm(dgt, w, out=dh_prev)
                    if m is not None:
                        dh_prev.mul_(m)
                if zh is not None:
                    dh_prev.addcmul_(dh, zh[t])
                if t > 0:
                    dh_prev.add_(d_out[t - 1])
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
            d_w = d_gates.view(T * B, G).t().mm(hm.view(T * B, H))
        return d_gates, dh, dc, d_w, None, None, None, None, None, None, None, None


def lstm_recurrence(xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, e: Optional[Tensor] = None,
                    r: Optional[Tensor] = None, s: Optional[Tensor] = None,
                    m: Optional[Tensor] = None, zc: Optional[Tensor] = None,
                    zh: Optional[Tensor] = None, cm: Optional[Tensor] = None):
    """Run :class:`LSTMRecurrence`; returns ``out`` (T, B, H), ``h_n``, ``c_n`` (B, H)."""
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xproj, h0, c0, w))
    return LSTMRecurrence.apply(xproj, h0, c0, w, e, r, s, m, zc, zh, cm, need_grad)
