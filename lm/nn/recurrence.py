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
    δxproj_t = δa_t

Every factor of the δa_t lines that does not depend on the incoming gradient is formed for
all steps at once before the loop, so the loop itself is two or three products and a
handful of elementwise ops per step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LSTMRecurrence(torch.autograd.Function):
    """``(out, h_n, c_n) = LSTMRecurrence.apply(xproj, h0, c0, w, dw, r, s, m, zc, zh, cm)``.

    Shapes: ``xproj`` (T, B, 4H); ``h0``, ``c0`` (B, H); ``w`` (4H, H) the mean recurrent
    weight W̄ (already shared-perturbed if the caller wants that); ``dw`` (4H, H) the flipout
    base perturbation ΔŴ or ``None``; ``r`` (B, 4H), ``s`` (B, H) its sign vectors; ``m``
    (B, H) Gal's scaled mask or ``None``; ``zc``, ``zh`` (T, B, H) zoneout weights or
    ``None``; ``cm`` (T, B, H) or (B, H) Semeniuta's scaled mask or ``None``. Gradients flow
    to ``xproj``, ``h0``, ``c0``, ``w`` and ``dw``; the noise tensors are constants.
    """

    @staticmethod
    def forward(ctx, xproj: Tensor, h0: Tensor, c0: Tensor, w: Tensor, dw: Optional[Tensor],
                r: Optional[Tensor], s: Optional[Tensor], m: Optional[Tensor],
                zc: Optional[Tensor], zh: Optional[Tensor], cm: Optional[Tensor]):
        T, B, G = xproj.shape
        H = G // 4
        xproj = xproj.contiguous()
        flip = dw is not None
        # Under Gal's mask the flipout product sees h̃∘s = h∘(m∘s): one multiply, not two.
        ms = (s * m if m is not None else s) if flip else None
        cm_step = cm is not None and cm.dim() == 3

        acts = torch.empty_like(xproj)                  # i, f, g, o after the nonlinearity
        cells = xproj.new_empty(T + 1, B, H)             # c_t after zoneout; cells[0] = c0
        tanh_c = xproj.new_empty(T, B, H)                # tanh(ĉ_t)
        cells[0].copy_(c0)
        cnew = xproj.new_empty(B, H) if zc is not None else None
        hnew = xproj.new_empty(B, H) if zh is not None else None
        gd = xproj.new_empty(B, H) if cm is not None else None
        if flip:
            # Both recurrent products as one batched product: z[:, t] = (h̃_{t-1}, h̃_{t-1}∘s)
            # against the stacked (W̄, ΔŴ). On CPU a batch of two runs ~15% faster than two
            # separate products (each thread streams its own matrix). Without Gal's mask
            # h̃ = h, so the step writes h_t straight into z[0, t+1].
            w2 = torch.stack([w, dw])                    # (2, 4H, H)
            w2t = w2.transpose(1, 2)
            z = xproj.new_empty(2, T + 1, B, H)
            torch.mul(h0, m, out=z[0, 0]) if m is not None else z[0, 0].copy_(h0)
            prod = xproj.new_empty(2, B, G)
            out = xproj.new_empty(T, B, H) if m is not None else z[0, 1:]
            hm = None
        else:
            w2 = z = None
            out = xproj.new_empty(T, B, H)
            hm = xproj.new_empty(T, B, H) if m is not None else None   # h̃_t, for δW̄
            wt = w.t()

        h = h0
        c = cells[0]
        for t in range(T):
            a = acts[t]
            if flip:
                torch.mul(h, ms, out=z[1, t])
                torch.bmm(z[:, t], w2t, out=prod)
                torch.addcmul(prod[0], prod[1], r, out=a).add_(xproj[t])
            else:
                hin = torch.mul(h, m, out=hm[t]) if m is not None else h
                torch.addmm(xproj[t], hin, wt, out=a)
            a[:, :2 * H].sigmoid_()
            a[:, 2 * H:3 * H].tanh_()
            a[:, 3 * H:].sigmoid_()
            i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            if cm is not None:
                g = torch.mul(g, cm[t] if cm_step else cm, out=gd)
            c_hat = torch.mul(f, c, out=cnew if zc is not None else cells[t + 1])
            c_hat.addcmul_(i, g)
            torch.tanh(c_hat, out=tanh_c[t])
            if zh is not None:
                torch.lerp(torch.mul(o, tanh_c[t], out=hnew), h, zh[t], out=out[t])
            else:
                torch.mul(o, tanh_c[t], out=out[t])
            if zc is not None:
                torch.lerp(c_hat, c, zc[t], out=cells[t + 1])
            h = out[t]
            c = cells[t + 1]
            if flip and m is not None:
                torch.mul(h, m, out=z[0, t + 1])

        zin = z[:, :T] if flip else None
        ctx.save_for_backward(acts, cells, tanh_c, out, h0, w, w2, r, ms, m, zc, zh, cm, hm, zin)
        if flip and m is None:
            out = out.clone()        # a view of z: hand back a tensor of its own
        h_n = out[T - 1].clone()
        c_n = cells[T].clone()
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hn: Tensor, d_cn: Tensor):
        (acts, cells, tanh_c, out, h0, w, w2, r, ms, m, zc, zh, cm, hm, zin) = ctx.saved_tensors
        T, B, G = acts.shape
        H = G // 4
        flip = w2 is not None
        d_out = d_out.contiguous()

        # Local derivative factors of every step at once (see the module docstring); the
        # loop multiplies them by the incoming δĥ / δĉ only.
        i, f, g, o = (acts[..., k * H:(k + 1) * H] for k in range(4))
        k = acts.new_empty(T, B, 4, H)
        sig_o = o * (1 - o)
        k_c = o * (1 - tanh_c * tanh_c)                       # δĉ += δĥ ∘ k_c
        torch.mul(tanh_c, sig_o, out=k[:, :, 3])              # δa_o = δĥ ∘ k_o
        gd = g * cm if cm is not None else g
        torch.mul(gd, i * (1 - i), out=k[:, :, 0])
        torch.mul(cells[:-1], f * (1 - f), out=k[:, :, 1])
        torch.mul(i, 1 - g * g, out=k[:, :, 2])
        if cm is not None:
            k[:, :, 2].mul_(cm)
        if zh is not None:
            # δĥ = (1-z^h) δh: fold (1-z^h) into both factors that δĥ meets.
            keep_h = 1 - zh
            k[:, :, 3].mul_(keep_h)
            k_c.mul_(keep_h)
        keep_c = 1 - zc if zc is not None else None
        f = f.contiguous()

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
                    torch.bmm(d2[:, t], w2, out=prod)
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

        d_w = d_dw = None
        if flip:
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                # δW̄ and δΔŴ over all steps: one batched product after the loop.
                dw2 = torch.bmm(d2.view(2, T * B, G).transpose(1, 2), zin.reshape(2, T * B, H))
                d_w, d_dw = dw2[0], dw2[1]
        elif ctx.needs_input_grad[3]:
            if hm is None:
                hm = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
            d_w = d_gates.view(T * B, G).t().mm(hm.view(T * B, H))
        return d_gates, dh, dc, d_w, d_dw, None, None, None, None, None, None
