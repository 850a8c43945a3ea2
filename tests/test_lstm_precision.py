"""flipout_lstm.nn.LSTM under torch.autocast: bfloat16 (CPU and CUDA) and float16 (CUDA).

Every variant against float32 on the same weights and the same pinned noise: outputs and
all gradients within bfloat16's error, float32 outputs, state and parameter gradients, the
cell state kept in float32 over a long sequence, and nothing changed outside autocast. The
CUDA tests skip without a GPU.

Tolerances. bfloat16 keeps 8 significant bits, unit roundoff u = 2^-8 ≈ 3.9e-3. A product
rounds its operands (relative u each) and its result (u), accumulating in float32 inside
the kernel; the float32 cell then sums them, so each gate preactivation carries an error of
order u, which the recurrence passes on with gains below 1 (σ', tanh' ≤ 1 and f < 1) over
these 12 steps. Measured over 5 seeds: forward 1.5-3.6e-3, gradients 0.8-5.7e-3 (norm
ratios ``‖a - b‖ / ‖b‖``, which do not blow up where an element crosses zero). Bounds:
forward 2e-2 (5u), gradients 3e-2 (8u). A lower bound of 1e-4 checks that the products
really ran in bfloat16 (float32 alone differs by ~1e-7).
"""
import dataclasses

import pytest
import torch

from flipout_lstm.nn import LSTM, LSTMNoise, recurrence

I, H, L, B, T = 16, 32, 2, 6, 12
FWD_TOL, GRAD_TOL, FLOOR = 2e-2, 3e-2, 1e-4

VARIANTS = {
    "none": {},
    "WD shared": dict(weight_drop=0.5),
    "Gauss shared": dict(weight_noise=0.5),
    "WD+flipout": dict(weight_drop=0.5, flipout=True),
    "Gauss+flipout": dict(weight_noise=0.5, input_weight_noise=0.3, flipout=True),
    "Gal": dict(hidden_dropout=0.25),
    "zoneout": dict(zoneout_cell=0.3, zoneout_hidden=0.1),
    "Semeniuta": dict(cell_dropout=0.25),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _noise_to(noise: LSTMNoise, device) -> LSTMNoise:
    """The same draws on another device."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    layers = tuple(dataclasses.replace(ln, **{f.name: move(getattr(ln, f.name))
                                              for f in dataclasses.fields(ln)})
                   for ln in noise.layers)
    return dataclasses.replace(noise, layers=layers)


def _run(m, x, hx, noise, autocast=None, device="cpu"):
    """Outputs, then the gradients of input, h0, c0 and every parameter, of a fixed loss."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    h0, c0 = (t.detach().clone().requires_grad_(True) for t in hx)
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out, (h, c) = m(x, (h0, c0), noise=noise)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g).to(t.device) for t in (out, h, c)]
    loss = sum((t * w).sum() for t, w in zip((out, h, c), weights))
    loss.backward()
    return [out, h, c], [x.grad, h0.grad, c0.grad] + [p.grad for p in m.parameters()]


def _setup(kw, seed=0, device="cpu", **extra):
    torch.manual_seed(seed)
    m = LSTM(I, H, L, **kw, **extra)
    x = torch.randn(T, B, I)
    hx = (torch.randn(L, B, H) * 0.5, torch.randn(L, B, H) * 0.5)
    noise = m.sample_noise(B, seq_len=T) if m._has_noise else None
    m.to(device)
    x, hx = x.to(device), (hx[0].to(device), hx[1].to(device))
    return m, x, hx, (None if noise is None else _noise_to(noise, device))


def _check_close(got, ref, tol, floor=FLOOR):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == torch.float32, (i, a.dtype)
        err = _rel(a, b)
        assert err <= tol, f"tensor {i}: relative error {err:.2e} > {tol:.0e}"
        if floor:
            assert err >= floor, f"tensor {i}: {err:.1e}, not computed in the low precision?"


# ------------------------------------------------------------------------- CPU, bfloat16
@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_autocast_against_float32(name):
    """Training, every variant: float32 outputs, state and gradients within bfloat16's error
    of the float32 run, with the same weights and pinned noise."""
    m, x, hx, noise = _setup(VARIANTS[name])
    outs32, grads32 = _run(m, x, hx, noise)
    outs, grads = _run(m, x, hx, noise, torch.bfloat16)
    assert recurrence.last_kernels["products"].endswith("bfloat16")   # the custom path, bf16
    _check_close(outs, outs32, FWD_TOL)
    _check_close(grads, grads32, GRAD_TOL)
    assert all(p.grad.dtype == torch.float32 and p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("name", ["none", "zoneout", "WD+flipout"])
def test_bf16_autocast_eval(name):
    m, x, hx, _ = _setup(VARIANTS[name])
    m.eval()
    with torch.no_grad():
        ref = m(x, hx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x, hx)
    _check_close([got[0], *got[1]], [ref[0], *ref[1]], FWD_TOL)


def test_bf16_input_and_state_are_accepted():
    """A bfloat16 input and state (a previous autocast layer's): products in bf16, state and
    outputs float32, gradients back in the caller's dtypes."""
    m, x, hx, noise = _setup(VARIANTS["Gal"])
    xb = x.bfloat16().requires_grad_(True)
    h0, c0 = (t.bfloat16().requires_grad_(True) for t in hx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(xb, (h0, c0), noise=noise)
    assert out.dtype == h.dtype == c.dtype == torch.float32
    (out.sum() + h.sum() + c.sum()).backward()
    assert xb.grad.dtype == h0.grad.dtype == c0.grad.dtype == torch.bfloat16
    ref, (hr, cr) = m(xb.detach().float(), (h0.detach().float(), c0.detach().float()),
                      noise=noise)
    assert _rel(out, ref) < FWD_TOL and _rel(c, cr) < FWD_TOL


def test_bf16_index_input_and_packed():
    """One-hot index input (the character model: a lookup, no product in layer 1) and a
    PackedSequence: float32 out."""
    from torch.nn.utils.rnn import pack_padded_sequence
    torch.manual_seed(0)
    m = LSTM(I, H, L, weight_drop=0.5, flipout=True)
    idx = torch.randint(0, I, (T, B))
    noise = m.sample_noise(B, seq_len=T)
    ref, (hr, cr) = m(idx, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(idx, noise=noise)
    assert out.dtype == torch.float32
    _check_close([out, h, c], [ref, hr, cr], FWD_TOL)
    x = torch.randn(T, B, I)
    packed = pack_padded_sequence(x, torch.tensor([T, 3, T, 5, 1, 7]), enforce_sorted=False)
    for kw in ({}, VARIANTS["Gal"]):
        m = LSTM(I, H, L, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = m(packed)
        assert out.data.dtype == h.dtype == c.dtype == torch.float32


def test_cell_state_stays_float32_over_a_long_sequence():
    """1000 steps that add ≈0.0066 to c each (forget gate ≈ 1): in bfloat16 each increment
    is below half the spacing of c once c ≥ 2, so a bfloat16 state stalls at 2. Ours, under
    autocast, tracks float32 (6.6) closely; the bfloat16-state recursion, and torch's own
    fused bf16 LSTM (oneDNN), do stall."""
    torch.manual_seed(0)
    Hs, Ts, Bs = 16, 1000, 4
    m = LSTM(8, Hs).eval()
    with torch.no_grad():
        m.weight_ih_l0.mul_(0.05)
        m.weight_hh_l0.mul_(0.05)
        m.bias_hh_l0.zero_()
        b = m.bias_ih_l0
        b.zero_()
        b[:Hs], b[Hs:2 * Hs], b[2 * Hs:3 * Hs] = -5.0, 12.0, 3.0   # i ≈ 0.0067, f ≈ 1, g ≈ 1
    x = torch.randn(Ts, Bs, 8)
    with torch.no_grad():
        _, (_, c32) = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, (_, c) = m(x)
        # The same recursion with c rounded to bfloat16 each step.
        W, U, bias = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0
        cb, hb = torch.zeros(Bs, Hs), torch.zeros(Bs, Hs)
        for t in range(Ts):
            i, f, g, o = (x[t] @ W.t() + hb @ U.t() + bias).chunk(4, 1)
            cb = (f.sigmoid() * cb + i.sigmoid() * g.tanh()).bfloat16().float()
            hb = o.sigmoid() * cb.tanh()
        fused = torch.nn.LSTM(8, Hs)
        fused.load_state_dict(m.state_dict())
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, (_, cf) = fused(x)
        except RuntimeError:                              # no bf16 LSTM in this oneDNN
            cf = None
    assert c32.mean() > 6.0
    assert c.dtype == torch.float32 and _rel(c, c32) < 1e-3
    assert _rel(cb, c32) > 0.3                            # a bfloat16 state drifts
    if cf is not None and cf.dtype == torch.bfloat16:
        assert _rel(cf.float(), c32) > 0.3                # so does torch's fused bf16 kernel


def test_outside_autocast_nothing_changes():
    """No autocast (or autocast switched off): float32 outputs and gradients bitwise those
    of a call outside any autocast region."""
    for name in ("none", "WD+flipout", "zoneout"):
        m, x, hx, noise = _setup(VARIANTS[name])
        ref = _run(m, x, hx, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            got = _run(m, x, hx, noise)
        for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
            assert torch.equal(a, b)


def test_backward_inside_an_autocast_region():
    """``loss.backward()`` called inside the autocast block (the backward runs on this
    thread): the hand-written backward's products keep their own dtypes."""
    m, x, hx, noise = _setup(VARIANTS["Gauss+flipout"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x, hx, noise=noise)
    (out.sum() + h.sum()).backward()
    grads_outside = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x, hx, noise=noise)
        (out.sum() + h.sum()).backward()
    for a, b in zip(grads_outside, (p.grad for p in m.parameters())):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_noise_draws_are_those_of_float32():
    """Under autocast the call draws the same noise, from the same RNG state, as outside."""
    torch.manual_seed(3)
    m = LSTM(I, H, L, weight_noise=0.5, flipout=True, zoneout_cell=0.2)
    x = torch.randn(T, B, I)
    torch.manual_seed(5)
    ref = m.sample_noise(B, seq_len=T)
    after_ref = torch.get_rng_state()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    assert torch.equal(torch.get_rng_state(), after_ref)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        drawn = m(x)[0]
        pinned = m(x, noise=ref)[0]
    assert torch.equal(drawn, pinned)
    assert all(t.dtype == torch.float32 for ln in ref.layers
               for t in dataclasses.asdict(ln).values() if t is not None)


# ------------------------------------------------------------------------------- CUDA
@pytest.fixture
def _no_tf32():
    """Float32 on CUDA in IEEE precision (cuDNN's RNN and matmul would use TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _cuda_vs_cpu(kw, autocast=None, custom=False, tol=1e-4):
    m, x, hx, noise = _setup(kw)
    m.force_custom = custom
    outs, grads = _run(m, x, hx, noise)                                  # CPU float32
    mc, xc, hxc, noisec = _setup(kw, device="cuda")
    mc.force_custom = custom
    outs_c, grads_c = _run(mc, xc, hxc, noisec, autocast, device="cuda")
    # float16 keeps 11 bits (u ≈ 4.9e-4): its errors sit lower than bfloat16's.
    floor = {None: 0, torch.float16: 1e-5}.get(autocast, FLOOR)
    _check_close([t.cpu() for t in outs_c], outs, tol if autocast is None else FWD_TOL, floor)
    _check_close([t.cpu() for t in grads_c], grads, tol if autocast is None else GRAD_TOL, floor)
    assert all(p.grad.dtype == torch.float32 for p in mc.parameters())


@CUDA
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_float32_matches_cpu(name, _no_tf32):
    """The custom recurrence (forced for every variant) and, where it runs, the cuDNN path
    with perturbed weights, noise and signs: CUDA float32 against CPU float32."""
    _cuda_vs_cpu(VARIANTS[name], custom=True)
    _cuda_vs_cpu(VARIANTS[name], custom=False)


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_autocast(name, dtype, _no_tf32):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _cuda_vs_cpu(VARIANTS[name], autocast=dtype, custom=True)
    _cuda_vs_cpu(VARIANTS[name], autocast=dtype, custom=False)


@CUDA
def test_cuda_rng_stream_is_deterministic_and_matches_sample_noise():
    """torch does not promise the same draws from CUDA's generator as from the CPU's, so:
    the same seed gives the same noise and outputs twice, and a call that draws its own
    noise draws exactly what ``sample_noise`` draws from the same RNG state."""
    m = LSTM(I, H, L, weight_noise=0.5, flipout=True, hidden_dropout=0.2, zoneout_cell=0.2,
             cell_dropout=0.2).cuda()
    x = torch.randn(T, B, I, device="cuda")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(m(x)[0])
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(11)
    noise = m.sample_noise(B, seq_len=T)
    assert torch.equal(m(x, noise=noise)[0], runs[0])
    for ln in noise.layers:
        assert ln.hh_delta.device.type == "cuda" and ln.hh_r.device.type == "cuda"
