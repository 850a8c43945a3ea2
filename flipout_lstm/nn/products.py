"""The layer's matrix products, each by one fixed kernel per device, dtype, CPU ISA, kind and size.

Rule: on the CPU, oneDNN's matmul primitive (``torch.ops.mkldnn._linear_pointwise``, the op
torch's own CPU compiler emits for ``linear``; where this torch build lacks it, or it fails a
probe on fixed values, plain ``mm``) takes every bfloat16 product; every float32 product where
torch's CPU kernels are AVX-512; and elsewhere the recurrence's per-step float32 products whose
weight holds at least :data:`STEP_WEIGHT_BYTES` (2 MiB). Everything else (on AVX2 and other
CPUs the float32 products over all steps at once, the input projection, its gradients and the
weight gradients, and the per-step products against a smaller weight; CUDA; float64; float16
on the CPU) uses ``mm`` / ``addmm`` / ``bmm``. Nothing is timed, so a run's numbers never
depend on which kernel won a race; what a run used is in its ``run.json`` (the CPU's ISA).

Why: ``torch.mm`` / ``addmm`` / ``F.linear`` run float32 through MKL, which on the AVX-512
AMD EPYCs reaches 67-95 GFLOP/s on this layer's large products against oneDNN's 110-211, so
there oneDNN wins: 1 thread, float32, median of 7, the word shape's input projection (1400 x
650 by 650 x 2600) 1.13x faster through oneDNN, its input gradient 1.60x, its weight gradient
1.57x, flipout's pair of recurrent weight gradients 1.18x, the per-step products at both
shapes too. On the AVX2-only EPYCs MKL's code is the faster for the weight gradients in every
reading (``benchmarks/product_kernels.py``, alternately in one process, 1 thread: the pair's
1.14-1.24x on family 25, 1.57-1.72x on family 23). The per-step products (batch 32 or 40
against the whole weight) depend on the weight's size and the CPU: on family 23 (2026-12-03)
the char shape's forward pair ran 1.31-1.35x and its backward pair 1.04-1.05x faster through
oneDNN, which took the layer's Gal, zoneout and Semeniuta rows there from 1.19-1.31x to
1.05-1.08x ``torch.nn.LSTM``; on family 25 the two kernels are within 6% either way at 512
units and more. Against the PTB study's 2 x 200 weight (625 KiB) oneDNN is the slower on
both: its per-step pairs 1.23-1.37x slower on family 25 (2026-12-04), the layer 3-5% slower
on family 23 (2026-12-03), and ``train.py``'s WD + Flipout step 1.08x faster on family 25
with these products on ``mm``; hence the threshold (``docs/performance.md``).

* :class:`Linear` / :class:`Pair`: the per-step product(s) ``h ↦ h Wᵀ`` of the recurrence
  (the rule's per-step kind), the weight prepared once per call (oneDNN: reordered for
  the batch; ``mm``: a contiguous ``Wᵀ``).
* :func:`mm_t` (``x Wᵀ``), :func:`tmm` / :func:`tmm_pair` (``Aᵀ B``, the weight gradients
  over all steps): one-off products, no preparation.
* :func:`linear`: ``x Wᵀ + b`` under autograd (the input projection), forward and backward
  by the same rule.

``dtype`` arguments (mixed precision): the product's operands are cast to it and its
result comes back in it; the caller keeps everything else (and the accumulation of the
results) in float32.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

_onednn_ok: Dict[torch.dtype, bool] = {}


def _onednn_lp():
    return torch.ops.mkldnn._linear_pointwise


def _probe(dtype: torch.dtype) -> bool:
    """Whether oneDNN's matmul (plain and reordered weight) runs here for ``dtype`` and agrees
    with ``mm`` in float64: fixed values, not ``randn``, so the global RNG is untouched."""
    try:
        w = torch.linspace(-1.0, 1.0, 32, dtype=torch.float64).reshape(8, 4)
        h = torch.linspace(0.5, -0.5, 12, dtype=torch.float64).reshape(3, 4)
        want = h @ w.t()
        wd, hd = w.to(dtype), h.to(dtype)
        plain = _onednn_lp()(hd, wd, None, "none", [], "")
        packed = _onednn_lp()(hd, torch.ops.mkldnn._reorder_linear_weight(wd, 3), None,
                              "none", [], "")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        return all(r.dtype == dtype and torch.allclose(r.double(), want, atol=tol)
                   for r in (plain, packed))
    except Exception:  # noqa: BLE001 - op missing from this build, or changed: fall back
        return False


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's matmul runs in this build for ``dtype`` (the probe, once per dtype)."""
    if dtype not in _onednn_ok:
        _onednn_ok[dtype] = _probe(dtype)
    return _onednn_ok[dtype]


def onednn_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's matmul can take this product at all: a CPU float32 or bfloat16 one,
    in a build where the probe passes (what the benchmarks and tests pin the rule to)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and onednn_available(dtype))


# Off AVX-512, a per-step float32 product against a weight (one matrix; flipout's pair reads
# two) smaller than this stays on ``mm``: measured on two AVX2 EPYCs, MKL is the faster at
# 2 x 200 (625 KiB) and oneDNN on family 23 at 512 units (4 MiB) and more. The module
# docstring and docs/performance.md have the figures; nothing between was measured.
STEP_WEIGHT_BYTES = 2 << 20


def uses_onednn(device: torch.device, dtype: torch.dtype, step_weight: int = 0) -> bool:
    """The rule: oneDNN, where it runs, for CPU bfloat16; for the recurrence's per-step
    float32 products (``step_weight``: their weight's element count) where the weight holds
    at least :data:`STEP_WEIGHT_BYTES`; and for every float32 product where torch's CPU
    kernels are AVX-512; else ``mm``. ``step_weight`` 0: a product over all steps."""
    if (dtype == torch.float32 and step_weight * dtype.itemsize < STEP_WEIGHT_BYTES
            and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return False
    return onednn_runs(device, dtype)


def kernel_name(device: torch.device, dtype: torch.dtype, step_weight: int = 0) -> str:
    """What :func:`uses_onednn` picks for a call whose per-step weight has ``step_weight``
    elements (for reports and benchmark tables): ``"onednn"`` or ``"mm"`` where the per-step
    and the other products agree, else ``"<per-step>+<the rest>"``, as ``"onednn+mm"`` for a
    large float32 weight on AVX2. Left out, ``step_weight`` counts as a weight below
    :data:`STEP_WEIGHT_BYTES`."""
    name = {True: "onednn", False: "mm"}
    step, rest = uses_onednn(device, dtype, step_weight), uses_onednn(device, dtype)
    return name[step] if step == rest else f"{name[step]}+{name[rest]}"


class Linear:
    """One per-step product ``h ↦ h Wᵀ`` (``W`` (N, K)) for batch ``B``, in ``dtype``
    (default ``W``'s). oneDNN: ``W`` reordered once for the batch (a copy per call of the
    recurrence); ``mm``: against a contiguous ``Wᵀ`` (faster than a transposed view), into
    a buffer of its own."""

    def __init__(self, w: Tensor, batch: int, dtype: Optional[torch.dtype] = None):
        self.dtype = w.dtype if dtype is None else dtype
        w = w.to(self.dtype)
        self.onednn = uses_onednn(w.device, self.dtype, step_weight=w.numel())
        if self.onednn:
            self.w = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch)
        else:
            self.wt = w.t().contiguous()
            self.out = w.new_empty(batch, w.size(0))

    def __call__(self, h: Tensor) -> Tensor:
        h = h.to(self.dtype)
        if self.onednn:
            return _onednn_lp()(h, self.w, None, "none", [], "")
        return torch.mm(h, self.wt, out=self.out)


class Pair:
    """Two per-step products ``(x0 M0ᵀ, x1 M1ᵀ)`` from a stacked ``x`` (2, B, K) and
    ``m = (M0, M1)``, each (N, K): two oneDNN products, or one batched ``bmm`` (one launch
    on CUDA) against a stacked contiguous ``(M0ᵀ, M1ᵀ)``."""

    def __init__(self, m, batch: int, dtype: Optional[torch.dtype] = None):
        self.dtype = m[0].dtype if dtype is None else dtype
        self.onednn = uses_onednn(m[0].device, self.dtype, step_weight=m[0].numel())
        if self.onednn:
            self.lins = (Linear(m[0], batch, self.dtype), Linear(m[1], batch, self.dtype))
        else:
            N, K = m[0].shape                                   # one copy, (2, K, N)
            self.mt = m[0].new_empty(2, K, N, dtype=self.dtype)
            self.mt[0].copy_(m[0].t())
            self.mt[1].copy_(m[1].t())
            self.out = m[0].new_empty(2, batch, N, dtype=self.dtype)

    def __call__(self, x: Tensor):
        if self.onednn:
            return self.lins[0](x[0]), self.lins[1](x[1])
        torch.bmm(x.to(self.dtype), self.mt, out=self.out)
        return self.out[0], self.out[1]


def mm_t(x: Tensor, w: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x Wᵀ`` for ``x`` (M, K), ``W`` (N, K), in ``dtype`` (default ``x``'s)."""
    dtype = x.dtype if dtype is None else dtype
    x, w = x.to(dtype), w.to(dtype)
    if uses_onednn(x.device, dtype):
        return _onednn_lp()(x, w, None, "none", [], "")
    return torch.mm(x, w.t())


def tmm(a: Tensor, b: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Aᵀ B`` for ``A`` (M, N), ``B`` (M, K): a weight gradient summed over all steps
    (M = T·B rows), in ``dtype`` (default ``A``'s).

    oneDNN computes ``(Bᵀ A)ᵀ``: its input operand is made contiguous, so it is given the
    smaller ``Bᵀ`` (K < N = 4H here), with ``Aᵀ`` as a strided weight; the result is the
    transposed view of a contiguous (K, N) tensor."""
    dtype = a.dtype if dtype is None else dtype
    a, b = a.to(dtype), b.to(dtype)
    if uses_onednn(a.device, dtype):
        return _onednn_lp()(b.t(), a.t(), None, "none", [], "").t()
    return torch.mm(a.t(), b)


def tmm_pair(a: Tensor, b: Tensor, dtype: Optional[torch.dtype] = None):
    """``(A0ᵀ B0, A1ᵀ B1)`` for stacked ``A`` (2, M, N), ``B`` (2, M, K): flipout's two
    weight gradients; two :func:`tmm` on oneDNN, one ``bmm`` elsewhere."""
    dtype = a.dtype if dtype is None else dtype
    if uses_onednn(a.device, dtype):
        return tmm(a[0], b[0], dtype), tmm(a[1], b[1], dtype)
    out = torch.bmm(a.to(dtype).transpose(1, 2), b.to(dtype))
    return out[0], out[1]


class _LinearFunction(torch.autograd.Function):
    """``y = x Wᵀ (+ b)`` with the forward and both backward products by :func:`mm_t` and
    :func:`tmm` in ``dtype``; ``y`` in ``out_dtype``. Where the rule is ``mm`` these are the
    ops, and so the numbers, of ``torch.addmm(b, x, W.t())`` under autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], dtype: torch.dtype,
                out_dtype: torch.dtype):
        ctx.dtype, ctx.x_dtype, ctx.w_dtype = dtype, x.dtype, w.dtype
        xc, wc = x.to(dtype), w.to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.has_bias = b is not None
        if b is not None and b.dtype == dtype:                     # the bias in the product
            if uses_onednn(x.device, dtype):
                return _onednn_lp()(xc, wc, b, "none", [], "")
            return torch.addmm(b, xc, wc.t())
        y = mm_t(xc, wc, dtype)
        return y.to(out_dtype) if b is None else torch.add(b, y)   # b: float32, y: bf16

    @staticmethod
    def backward(ctx, dy: Tensor):
        xc, wc = ctx.saved_tensors
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = mm_t(dy, wc.t(), ctx.dtype).to(ctx.x_dtype)          # δy W
            if ctx.needs_input_grad[1]:
                dw = tmm(dy, xc, ctx.dtype).to(ctx.w_dtype)               # δyᵀ x
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy.sum(0)
        return dx, dw, db, None, None


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None,
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x Wᵀ + b`` for ``x`` (M, K), under autograd; the products in ``dtype`` (default
    ``W``'s), the result in ``W``'s dtype (the bias added there). Gradients reach ``x``,
    ``W`` and ``b`` in their own dtypes."""
    dtype = w.dtype if dtype is None else dtype
    return _LinearFunction.apply(x, w, b, dtype, w.dtype)
