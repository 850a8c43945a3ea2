"""torch.autograd.gradcheck of the hand-written backward of LSTMRecurrence, noise fixed."""
import pytest
import torch
import torch.nn.functional as F

from flipout_lstm.nn import LSTM, lstm_recurrence

DT = torch.float64
T, B, H = 4, 3, 3


def _bern(shape, p):
    return torch.empty(shape, dtype=DT).bernoulli_(p)


def _signs(shape):
    return _bern(shape, 0.5) * 2 - 1


VARIANTS = {
    "plain": {},
    "flipout-dropconnect": dict(flip="dropconnect"),
    "flipout-gauss": dict(flip="gauss"),
    "gal": dict(gal=True),
    "zoneout": dict(zc=True, zh=True),
    "zoneout-cell-only": dict(zc=True),
    "zoneout-expectation": dict(zexp=True),
    "semeniuta-per-step": dict(cm="step"),
    "semeniuta-per-seq": dict(cm="seq"),
    "flipout+gal": dict(flip="gauss", gal=True),
    "flipout+zoneout+semeniuta": dict(flip="dropconnect", zc=True, zh=True, cm="step"),
    "all": dict(flip="gauss", gal=True, zc=True, zh=True, cm="seq"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_recurrence_gradcheck(name):
    v = VARIANTS[name]
    xp = torch.randn(T, B, 4 * H, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    c0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    w = torch.randn(4 * H, H, dtype=DT, requires_grad=True)
    e = r = s = m = zc = zh = cm = None
    if v.get("flip") == "dropconnect":
        e = _signs((4 * H, H))                         # ΔŴ = W̄∘ξ
    elif v.get("flip") == "gauss":
        e = 0.8 * torch.randn(4 * H, H, dtype=DT)     # ΔŴ = σ W̄∘ε
    if e is not None:
        r, s = _signs((B, 4 * H)), _signs((B, H))
    if v.get("gal"):
        m = _bern((B, H), 0.7) / 0.7
    if v.get("zc"):
        zc = _bern((T, B, H), 0.5)
    if v.get("zh"):
        zh = _bern((T, B, H), 0.3)
    if v.get("zexp"):
        zc = torch.full((1, 1, 1), 0.4, dtype=DT).expand(T, B, H)
        zh = torch.full((1, 1, 1), 0.1, dtype=DT).expand(T, B, H)
    if v.get("cm") == "step":
        cm = _bern((T, B, H), 0.7) / 0.7
    elif v.get("cm") == "seq":
        cm = _bern((B, H), 0.7) / 0.7
    inputs = (xp, h0, c0, w)

    def f(xp, h0, c0, w):
        return lstm_recurrence(xp, h0, c0, w, e, r, s, m, zc, zh, cm)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kw", [dict(weight_drop=0.5, flipout=True, input_weight_drop=0.5),
                                dict(weight_noise=0.6, flipout=True, input_weight_noise=0.4,
                                     hidden_dropout=0.2, zoneout_cell=0.3, cell_dropout=0.2),
                                dict(weight_noise=0.6, zoneout_hidden=0.3)],
                         ids=["flipout-dropconnect-both", "flipout-gauss-combo", "shared"])
def test_module_gradcheck_wrt_parameters(kw):
    """End to end: parameters -> ΔŴ (autograd) -> custom Function, with the noise fixed."""
    lstm = LSTM(3, H, 2, dtype=DT, **kw)
    noise = lstm.sample_noise(B, seq_len=T)
    names = [n for n, _ in lstm.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in lstm.parameters())
    idx = torch.randint(0, 3, (T, B))

    def f(*ps):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, ps)), (idx,),
                                                 {"noise": noise})
        return out, h, c

    assert torch.autograd.gradcheck(f, params)


def test_one_hot_projection_is_a_lookup(monkeypatch):
    """Index input never builds a dense one-hot in the custom path."""
    lstm = LSTM(50, 4, 1, weight_noise=1.0, flipout=True, dtype=DT)
    calls = []
    monkeypatch.setattr(F, "one_hot", lambda *a, **k: calls.append(1))
    out, _ = lstm(torch.randint(0, 50, (5, 2)))
    assert out.shape == (5, 2, 4) and not calls
