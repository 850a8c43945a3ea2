"""PackedSequence input to flipout_lstm.nn.LSTM, every variant, both execution paths.

(a) no noise (eval, or "none" in training): the same outputs, h_n, c_n and gradients as
    torch.nn.LSTM on the same weights and the same PackedSequence, sorted or not;
(b) with pinned noise: each sequence of a packed batch of unequal lengths gives what it
    gives alone, with its own rows of that noise;
(c) gradients: padded positions get none and add none (input, state and weight gradients
    equal the sum over the sequences run alone);
and a packed batch whose sequences all have T steps reproduces the plain (T, B, I) path
draw for draw from the same RNG seed.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from flipout_lstm.nn import LSTM, LayerNoise, LSTMNoise

DT = torch.float64
TOL = dict(rtol=1e-5, atol=1e-5)       # the brief's bound; float64 agrees far closer
TIGHT = dict(rtol=1e-9, atol=1e-11)
I, H, L = 4, 8, 2
LENGTHS = [5, 2, 7, 3]                 # unsorted, so enforce_sorted=False permutes

VARIANTS = {
    "none": {},
    "WD shared": dict(weight_drop=0.5, input_weight_drop=0.3),
    "Gauss shared": dict(weight_noise=0.5),
    "WD+flipout": dict(weight_drop=0.5, flipout=True),
    "Gauss+flipout": dict(weight_noise=0.5, input_weight_noise=0.3, flipout=True),
    "Gal": dict(hidden_dropout=0.3),
    "zoneout": dict(zoneout_cell=0.3, zoneout_hidden=0.2),
    "Semeniuta": dict(cell_dropout=0.3),
    "Semeniuta per-seq": dict(cell_dropout=0.3, cell_dropout_per_step=False),
    "all": dict(weight_noise=0.5, flipout=True, hidden_dropout=0.2, zoneout_cell=0.2,
                zoneout_hidden=0.1, cell_dropout=0.2),
}
NOISY = [k for k in VARIANTS if k != "none"]


def _model(kw, dtype=DT, **extra):
    return LSTM(I, H, L, dtype=dtype, **kw, **extra)


def _padded(lengths, dtype=DT):
    """(T, B, I) input, zero past each length (as pad_packed_sequence would give)."""
    T, B = max(lengths), len(lengths)
    x = torch.randn(T, B, I, dtype=dtype)
    for b, n in enumerate(lengths):
        x[n:, b] = 0
    return x


def _state(B, dtype=DT):
    return (torch.randn(L, B, H, dtype=dtype, requires_grad=True),
            torch.randn(L, B, H, dtype=dtype, requires_grad=True))


def _slice_noise(noise: LSTMNoise, b: int, steps: int) -> LSTMNoise:
    """Example ``b``'s share of ``noise``: the same base perturbations, its sign vectors and
    masks, its per-step masks for its own ``steps``."""
    def cut(name, v):
        if v is None or name in ("hh_delta", "ih_delta"):
            return v
        return v[:steps, b:b + 1] if v.dim() == 3 else v[b:b + 1]
    layers = tuple(LayerNoise(**{k: cut(k, v) for k, v in vars(ln).items()})
                   for ln in noise.layers)
    return LSTMNoise(layers=layers, batch_size=1, seq_len=steps)


def _loss(out_pad, h, c, w):
    return (out_pad * w[0]).sum() + (h * w[1]).sum() + (c * w[2]).sum()


def _loss_weights(T, B, dtype=DT):
    return [torch.randn(T, B, H, dtype=dtype), torch.randn(L, B, H, dtype=dtype),
            torch.randn(L, B, H, dtype=dtype)]


# ------------------------------------------------------------------------- (a) no noise
@pytest.mark.parametrize("custom", [False, True], ids=["fused", "custom"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("name", [k for k in VARIANTS if k not in ("zoneout", "all")]
                         + ["none-train"])
def test_no_noise_matches_nn_lstm(name, enforce_sorted, custom):
    """Eval (noise off), and the noiseless model in training: torch.nn.LSTM's numbers,
    state and gradients, on both paths."""
    kw = VARIANTS["none" if name == "none-train" else name]
    m = _model(kw)
    ref = torch.nn.LSTM(I, H, L, dtype=DT)
    ref.load_state_dict(m.state_dict())
    m.force_custom = custom
    if name != "none-train":
        m.eval()
        ref.eval()
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    x = _padded(lengths).requires_grad_(True)
    hx = _state(len(lengths))
    w = _loss_weights(max(lengths), len(lengths))
    res = []
    for model in (ref, m):
        seq = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        out, (h, c) = model(seq, hx)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, seq.batch_sizes)
        for a, b in ((out.sorted_indices, seq.sorted_indices),
                     (out.unsorted_indices, seq.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        out_pad, _ = pad_packed_sequence(out)
        grads = torch.autograd.grad(_loss(out_pad, h, c, w), [x, *hx, *model.parameters()])
        res.append((out.data, h, c) + grads)
    for a, b in zip(*res):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, **TOL)
        torch.testing.assert_close(b, a, **TIGHT)


# -------------------------------------------------------- (b), (c) each sequence alone
def _check_against_single_sequences(m, noise, lengths, dtype=DT, tol=TIGHT):
    """Packed batch vs each sequence alone with its own share of ``noise``: outputs,
    h_n, c_n, and the gradients of the input (zero at padded positions), the state and
    the weights (the sum over the sequences)."""
    T, B = max(lengths), len(lengths)
    x = _padded(lengths, dtype).requires_grad_(True)
    hx = _state(B, dtype)
    w = _loss_weights(T, B, dtype)
    params = list(m.parameters())
    seq = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, (h, c) = m(seq, hx, noise=noise)
    out_pad, got_len = pad_packed_sequence(out)
    assert got_len.tolist() == lengths and out_pad.shape == (T, B, H)
    gx, gh, gc, *gw = torch.autograd.grad(_loss(out_pad, h, c, w), [x, *hx, *params])
    sum_gw = [torch.zeros_like(p) for p in params]
    for b, n in enumerate(lengths):
        xb = x.detach()[:n, b:b + 1].clone().requires_grad_(True)
        hb = tuple(s.detach()[:, b:b + 1].clone().requires_grad_(True) for s in hx)
        nb = None if noise is None else _slice_noise(noise, b, n)
        ob, (hnb, cnb) = m(xb, hb, noise=nb)
        torch.testing.assert_close(out_pad[:n, b:b + 1], ob, **tol)
        torch.testing.assert_close(h[:, b:b + 1], hnb, **tol)
        torch.testing.assert_close(c[:, b:b + 1], cnb, **tol)
        wb = [w[0][:n, b:b + 1], w[1][:, b:b + 1], w[2][:, b:b + 1]]
        gxb, ghb, gcb, *gwb = torch.autograd.grad(_loss(ob, hnb, cnb, wb), [xb, *hb, *params])
        torch.testing.assert_close(gx[:n, b:b + 1], gxb, **tol)
        assert torch.count_nonzero(gx[n:, b]) == 0            # padded input: no gradient
        torch.testing.assert_close(gh[:, b:b + 1], ghb, **tol)
        torch.testing.assert_close(gc[:, b:b + 1], gcb, **tol)
        sum_gw = [s + g for s, g in zip(sum_gw, gwb)]
    for a, b in zip(gw, sum_gw):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", NOISY)
def test_noise_each_sequence_as_if_alone(name):
    m = _model(VARIANTS[name])
    noise = m.sample_noise(len(LENGTHS), seq_len=max(LENGTHS))
    _check_against_single_sequences(m, noise, LENGTHS)


@pytest.mark.parametrize("name", ["none", "zoneout", "all"])
def test_eval_each_sequence_as_if_alone(name):
    """Eval on the custom path (zoneout's expectation, or forced): frozen steps are exact
    there too."""
    m = _model(VARIANTS[name])
    m.force_custom = name == "none"
    m.eval()
    _check_against_single_sequences(m, None, LENGTHS)


def test_float32_within_the_brief_bound():
    """float32 products are blocked differently for B = 4 than for B = 1 (oneDNN reorders
    the weights per batch size); still within 1e-5."""
    m = _model(VARIANTS["Gauss+flipout"], dtype=torch.float32)
    noise = m.sample_noise(len(LENGTHS), seq_len=max(LENGTHS))
    _check_against_single_sequences(m, noise, LENGTHS, dtype=torch.float32, tol=TOL)


@pytest.mark.parametrize("name", ["WD shared", "Gal"], ids=["fused", "custom"])
def test_lengths_of_one_and_a_single_sequence(name):
    m = _model(VARIANTS[name])
    for lengths in ([1, 3, 1], [4]):
        noise = m.sample_noise(len(lengths), seq_len=max(lengths))
        _check_against_single_sequences(m, noise, lengths)


# ------------------------------------------------------------- equal lengths = plain path
@pytest.mark.parametrize("name", list(VARIANTS))
def test_equal_lengths_reproduce_the_plain_path(name):
    """All sequences of T steps, packed in a permuted order, noise drawn by the call from
    the same seed: the plain tensor's outputs and states (so noise rows index the same
    examples), whatever batch_first says."""
    kw = VARIANTS[name]
    custom = name not in ("none", "WD shared", "Gauss shared")
    dropout = 0.3 if custom else 0.0     # between layers; torch's packed kernel draws its own
    m = _model(kw, batch_first=True, dropout=dropout)
    T, B = 6, 4
    x = torch.randn(B, T, I, dtype=DT)
    hx = _state(B)
    perm = torch.tensor([2, 0, 3, 1])
    seq = PackedSequence(x.transpose(0, 1)[:, perm].reshape(T * B, I),
                         torch.full((T,), B, dtype=torch.long), perm, torch.argsort(perm))
    torch.manual_seed(5)
    o1, (h1, c1) = m(x, hx)
    torch.manual_seed(5)
    o2, (h2, c2) = m(seq, hx)
    o2, _ = pad_packed_sequence(o2, batch_first=True)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b, a, **TIGHT)


# ----------------------------------------------------------------------------- misc
@pytest.mark.parametrize("kw", [{}, dict(input_weight_noise=0.5, flipout=True),
                                dict(hidden_dropout=0.3)], ids=["fused", "flipout", "gal"])
def test_index_packed_equals_one_hot_packed(kw):
    m = _model(kw)
    idx = torch.randint(0, I, (max(LENGTHS), len(LENGTHS)))
    noise = m.sample_noise(len(LENGTHS), seq_len=max(LENGTHS))
    lens = torch.tensor(LENGTHS)
    a = pack_padded_sequence(idx, lens, enforce_sorted=False)
    b = pack_padded_sequence(F.one_hot(idx, I).to(DT), lens, enforce_sorted=False)
    oa, (ha, ca) = m(a, noise=noise)
    ob, (hb, cb) = m(b, noise=noise)
    ga = torch.autograd.grad(oa.data.sum() + ha.sum(), list(m.parameters()))
    gb = torch.autograd.grad(ob.data.sum() + hb.sum(), list(m.parameters()))
    for u, v in zip((oa.data, ha, ca) + ga, (ob.data, hb, cb) + gb):
        torch.testing.assert_close(u, v, **TIGHT)


def test_packed_argument_errors():
    m = _model(VARIANTS["WD+flipout"])
    seq = pack_padded_sequence(_padded(LENGTHS), torch.tensor(LENGTHS), enforce_sorted=False)
    with pytest.raises(ValueError, match="batch_size=3"):
        m(seq, noise=m.sample_noise(3))
    with pytest.raises(ValueError, match="h0 and c0"):
        m(seq, (torch.zeros(L, 3, H, dtype=DT), torch.zeros(L, 3, H, dtype=DT)))
    bad = pack_padded_sequence(torch.randn(7, 4, I + 1, dtype=DT), torch.tensor(LENGTHS),
                               enforce_sorted=False)
    with pytest.raises(ValueError, match="input.size"):
        m(bad)
