"""flipout_lstm.nn.LSTM against torch.nn.LSTM (no noise, eval) and against a plain autograd reference
that spells out each example's effective weights (every noise variant, fixed noise)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from flipout_lstm.nn import LSTM, products, recurrence

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _pair(I, H, L, **kw):
    ref = torch.nn.LSTM(I, H, L, batch_first=kw.get("batch_first", False), dtype=DT)
    m = LSTM(I, H, L, dtype=DT, **kw)
    m.load_state_dict(ref.state_dict())
    return ref, m


def _run(model, x, hx, weights):
    """Outputs and the gradients of a fixed random functional of them."""
    out, (h, c) = model(x, hx)
    loss = (out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()
    leaves = list(model.parameters()) + [t for t in ([x] + list(hx or ())) if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    return (out, h, c), grads


@pytest.mark.parametrize("layers,batch_first,with_state,custom",
                         list(itertools.product([1, 2, 3], [False, True], [False, True],
                                                [False, True])))
def test_no_noise_matches_nn_lstm(layers, batch_first, with_state, custom):
    T, B, I, H = 5, 3, 4, 6
    ref, m = _pair(I, H, layers, batch_first=batch_first)
    m.force_custom = custom
    x = torch.randn(B, T, I, dtype=DT) if batch_first else torch.randn(T, B, I, dtype=DT)
    x.requires_grad_(True)
    hx = None
    if with_state:
        hx = (torch.randn(layers, B, H, dtype=DT, requires_grad=True),
              torch.randn(layers, B, H, dtype=DT, requires_grad=True))
    out_shape = x.shape[:-1] + (H,)
    weights = [torch.randn(out_shape, dtype=DT), torch.randn(layers, B, H, dtype=DT),
               torch.randn(layers, B, H, dtype=DT)]
    outs_r, grads_r = _run(ref, x, hx, weights)
    outs_m, grads_m = _run(m, x, hx, weights)
    for a, b in zip(outs_r + grads_r, outs_m + grads_m):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, **TOL)


def test_no_bias_and_unbatched_match_nn_lstm():
    ref = torch.nn.LSTM(3, 5, 2, bias=False, dtype=DT)
    m = LSTM(3, 5, 2, bias=False, dtype=DT)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, dtype=DT)                        # unbatched (T, I)
    hx = (torch.randn(2, 5, dtype=DT), torch.randn(2, 5, dtype=DT))
    for custom in (False, True):
        m.force_custom = custom
        o1, (h1, c1) = ref(x, hx)
        o2, (h2, c2) = m(x, hx)
        assert o2.shape == (4, 5) and h2.shape == (2, 5)
        for a, b in ((o1, o2), (h1, h2), (c1, c2)):
            torch.testing.assert_close(b, a, **TOL)


def test_state_dict_round_trip_both_ways():
    ref = torch.nn.LSTM(4, 6, 2)
    m = LSTM(4, 6, 2, weight_drop=0.5, flipout=True, zoneout_cell=0.1)
    assert list(m.state_dict()) == list(ref.state_dict())
    assert all(m.state_dict()[k].shape == v.shape for k, v in ref.state_dict().items())
    m.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(4, 6, 2)
    back.load_state_dict(m.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(m.state_dict()[k], v)


def test_default_init_matches_nn_lstm():
    torch.manual_seed(3)
    a = torch.nn.LSTM(7, 9, 2)
    torch.manual_seed(3)
    b = LSTM(7, 9, 2, weight_noise=0.3)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)


EVAL_CONFIGS = [
    {}, dict(weight_drop=0.5), dict(weight_noise=1.0), dict(weight_drop=0.5, flipout=True),
    dict(weight_noise=0.5, flipout=True, input_weight_noise=0.3), dict(hidden_dropout=0.3),
    dict(cell_dropout=0.3), dict(cell_dropout=0.3, cell_dropout_per_step=False),
    dict(input_weight_drop=0.4),
]


@pytest.mark.parametrize("kw", EVAL_CONFIGS, ids=lambda kw: ",".join(kw) or "none")
def test_eval_is_deterministic_and_equals_nn_lstm(kw):
    ref, m = _pair(3, 5, 2, **kw)
    m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = m(x)
    o3, _ = m(x)
    assert torch.equal(o2, o3)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b, a, **TOL)


def _zoneout_expectation(ref, x, pc, ph):
    """Plain loop: c_t = pc·c_{t-1} + (1-pc)·ĉ_t, h_t = ph·h_{t-1} + (1-ph)·ĥ_t."""
    T, B, _ = x.shape
    H, L = ref.hidden_size, ref.num_layers
    hs, cs = [], []
    for layer in range(L):
        w_ih, w_hh, b_ih, b_hh = (getattr(ref, f"{n}_l{layer}")
                                  for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        h = torch.zeros(B, H, dtype=DT)
        c = torch.zeros(B, H, dtype=DT)
        outs = []
        for t in range(T):
            i, f, g, o = (x[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            c = pc * c + (1 - pc) * c_new
            h = ph * h + (1 - ph) * h_new
            outs.append(h)
        x = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return x, torch.stack(hs), torch.stack(cs)


def test_zoneout_eval_is_the_expectation():
    ref, m = _pair(3, 5, 2, zoneout_cell=0.5, zoneout_hidden=0.05)
    m.eval()
    x = torch.randn(6, 4, 3, dtype=DT)
    o, (h, c) = m(x)
    o2, _ = m(x)
    assert torch.equal(o, o2)
    with torch.no_grad():
        eo, eh, ec = _zoneout_expectation(ref, x, 0.5, 0.05)
    for a, b in ((eo, o), (eh, h), (ec, c)):
        torch.testing.assert_close(b, a, **TOL)


# --------------------------------------------------------------------------- noise reference
def _effective(w, delta, r, s, B):
    """Per-example weights (B, out, in): shared W̄∘(1+e), or flipout W̄ + (W̄∘e)∘(r_n s_nᵀ)."""
    if delta is None:
        return w.expand(B, *w.shape)
    if r is None:
        return (w * (1 + delta)).expand(B, *w.shape)
    return w + (w * delta) * (r[:, :, None] * s[:, None, :])


def reference_forward(m, x, hx, noise):
    """Straightforward autograd LSTM using each example's explicit weights and masks.

    ``x`` time-major dense (T, B, I); between-layer dropout must be 0.
    """
    T, B, _ = x.shape
    hs, cs = [], []
    for layer in range(m.num_layers):
        ln = noise.layers[layer]
        w_ih, w_hh, b_ih, b_hh = m._layer_weights(layer)
        wi = _effective(w_ih, ln.ih_delta, ln.ih_r, ln.ih_s, B)
        wh = _effective(w_hh, ln.hh_delta, ln.hh_r, ln.hh_s, B)
        h, c = hx[0][layer], hx[1][layer]
        outs = []
        for t in range(T):
            hin = h if ln.hidden_mask is None else h * ln.hidden_mask
            a = torch.einsum("bgi,bi->bg", wi, x[t]) + torch.einsum("bgh,bh->bg", wh, hin)
            if b_ih is not None:
                a = a + b_ih + b_hh
            i, f, g, o = a.chunk(4, 1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            if ln.cell_mask is not None:
                g = g * (ln.cell_mask[t] if ln.cell_mask.dim() == 3 else ln.cell_mask)
            c_new = f * c + i * g
            h_new = o * torch.tanh(c_new)
            if ln.zoneout_cell is not None:
                c_new = ln.zoneout_cell[t] * c + (1 - ln.zoneout_cell[t]) * c_new
            if ln.zoneout_hidden is not None:
                h_new = ln.zoneout_hidden[t] * h + (1 - ln.zoneout_hidden[t]) * h_new
            h, c = h_new, c_new
            outs.append(h)
        x = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return x, torch.stack(hs), torch.stack(cs)


NOISE_CONFIGS = [
    dict(weight_drop=0.5),
    dict(weight_noise=0.7),
    dict(input_weight_drop=0.3, weight_noise=0.4),
    dict(weight_drop=0.5, flipout=True),
    dict(weight_noise=1.0, flipout=True),
    dict(input_weight_drop=0.5, weight_drop=0.5, flipout=True),
    dict(input_weight_noise=0.5, flipout=True),
    dict(hidden_dropout=0.3),
    dict(zoneout_cell=0.5, zoneout_hidden=0.2),
    dict(cell_dropout=0.3),
    dict(cell_dropout=0.3, cell_dropout_per_step=False),
    dict(weight_noise=0.5, flipout=True, hidden_dropout=0.3, zoneout_cell=0.3,
         zoneout_hidden=0.1, cell_dropout=0.2),
    dict(weight_drop=0.5, hidden_dropout=0.2, cell_dropout=0.2, cell_dropout_per_step=False),
]


@pytest.mark.parametrize("kw", NOISE_CONFIGS, ids=lambda kw: ",".join(f"{k}" for k in kw))
@pytest.mark.parametrize("index", [False, True], ids=["dense", "index"])
def test_noise_matches_explicit_reference(kw, index):
    T, B, I, H, L = 4, 3, 5, 4, 2
    m = LSTM(I, H, L, dtype=DT, **kw)
    noise = m.sample_noise(B, seq_len=T)
    idx = torch.randint(0, I, (T, B))
    x = F.one_hot(idx, I).to(DT)
    hx = (torch.randn(L, B, H, dtype=DT), torch.randn(L, B, H, dtype=DT))
    out, (h, c) = m(idx if index else x, hx, noise=noise)
    r_out, r_h, r_c = reference_forward(m, x, hx, noise)
    w = [torch.randn_like(t) for t in (out, h, c)]
    params = list(m.parameters())
    g = torch.autograd.grad(sum((a * b).sum() for a, b in zip((out, h, c), w)), params)
    gr = torch.autograd.grad(sum((a * b).sum() for a, b in zip((r_out, r_h, r_c), w)), params)
    for a, b in zip((r_out, r_h, r_c) + gr, (out, h, c) + g):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("kw", [{}, dict(weight_noise=0.5), dict(weight_noise=0.5, flipout=True),
                                dict(input_weight_drop=0.5, flipout=True)],
                         ids=["none", "shared", "flipout", "input-flipout"])
def test_index_input_equals_one_hot(kw):
    T, B, I, H = 5, 3, 7, 4
    m = LSTM(I, H, 1, batch_first=True, dtype=DT, **kw)
    idx = torch.randint(0, I, (B, T))
    noise = m.sample_noise(B, seq_len=T)
    for custom in (False, True):
        m.force_custom = custom
        o1, (h1, _) = m(idx, noise=noise)
        o2, (h2, _) = m(F.one_hot(idx, I).to(DT), noise=noise)
        g1 = torch.autograd.grad(o1.sum() + h1.sum(), list(m.parameters()))
        g2 = torch.autograd.grad(o2.sum() + h2.sum(), list(m.parameters()))
        for a, b in zip((o2,) + g2, (o1,) + g1):
            torch.testing.assert_close(b, a, **TOL)
    m.eval()
    torch.testing.assert_close(m(idx)[0], m(F.one_hot(idx, I).to(DT))[0], **TOL)


@pytest.mark.parametrize("kw", [dict(weight_noise=0.5, flipout=True), dict(hidden_dropout=0.3),
                                dict(weight_drop=0.5, flipout=True, hidden_dropout=0.2)],
                         ids=["flipout", "gal", "flipout+gal"])
def test_float32_fast_paths_match_float64(kw):
    """float32 on the CPU takes the rule's float32 products (oneDNN where it runs) and
    float64 takes ``mm``: the same noise gives the same numbers, to float32 rounding."""
    T, B, I, H = 6, 4, 5, 64
    m32 = LSTM(I, H, 1, **kw)
    m64 = LSTM(I, H, 1, dtype=DT, **kw)
    m64.load_state_dict(m32.state_dict())
    noise = m32.sample_noise(B, seq_len=T)
    noise64 = type(noise)(layers=tuple(type(ln)(**{k: None if v is None else v.to(DT)
                                                     for k, v in vars(ln).items()})
                                       for ln in noise.layers), batch_size=B, seq_len=T)
    x = torch.randn(T, B, I)
    o32, _ = m32(x, noise=noise)
    assert recurrence.last_kernels["products"] == products.kernel_name(torch.device("cpu"),
                                                                       torch.float32)
    o64, _ = m64(x.to(DT), noise=noise64)
    assert recurrence.last_kernels["products"] == "mm"
    g32 = torch.autograd.grad(o32.sum(), list(m32.parameters()))
    g64 = torch.autograd.grad(o64.sum(), list(m64.parameters()))
    torch.testing.assert_close(o32.to(DT), o64, rtol=1e-4, atol=1e-5)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.to(DT), b, rtol=1e-3, atol=1e-4)
