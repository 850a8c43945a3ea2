"""Noise statistics: flipout's per-example weights, shared masks, the noise object, and the
gradient variance of a batch mean (shared noise levels off, flipout falls like 1/N)."""
import pytest
import torch

from flipout_lstm.nn import LSTM, LayerNoise, LSTMNoise

DT = torch.float64


def _probe_lstm(H, **kw):
    """An LSTM whose g-block of W_hh has entries bounded away from zero (so ratios are safe)."""
    lstm = LSTM(1, H, 1, bias=False, dtype=DT, **kw)
    with torch.no_grad():
        w = lstm.weight_hh_l0
        w.copy_((torch.rand_like(w) * 0.5 + 0.5) * torch.sign(torch.randn_like(w)))
    return lstm


def effective_g_block(lstm, B):
    """Each example's effective W_hh[g-block] (B, H, H) in one training call, by probing.

    With zero input, zero bias and h0 = c0 = 0 every preactivation is 0 whatever the
    weight, so i = f = o = 1/2, g = 0 and h1 = o∘tanh(i∘g): ∂h1/∂h0 = ¼ W_n[g-block].
    """
    H = lstm.hidden_size
    h0 = torch.zeros(1, B, H, dtype=DT, requires_grad=True)
    c0 = torch.zeros(1, B, H, dtype=DT)
    out, _ = lstm(torch.zeros(1, B, 1, dtype=DT), (h0, c0))
    rows = [torch.autograd.grad(out[0, :, k].sum(), h0, retain_graph=True)[0][0]
            for k in range(H)]
    return 4 * torch.stack(rows, 1)


def _draws(lstm, B, n):
    w_g = lstm.weight_hh_l0.detach()[2 * lstm.hidden_size:3 * lstm.hidden_size]
    return torch.stack([effective_g_block(lstm, B) for _ in range(n)]) / w_g   # (n, B, H, H)


def test_flipout_dropconnect_effective_weight_distribution():
    torch.manual_seed(11)
    lstm = _probe_lstm(6, weight_drop=0.5, flipout=True)
    ratio = _draws(lstm, 32, 150)
    # Every effective entry is 0 or 2W (DropConnect at p = 0.5 with inverted scaling)...
    is_two = (ratio - 2).abs() < 1e-9
    assert torch.all(is_two | (ratio.abs() < 1e-9))
    # ...each with probability 1/2: 172,800 entries; per draw only the 36 base signs ξ are
    # shared, and per-example sign flips make the examples' entries independent fair coins,
    # so the std of the fraction is ~0.0012. Bound at 0.01 (> 8 std).
    assert abs(is_two.double().mean().item() - 0.5) < 0.01
    # Two examples: perturbations ±W, uncorrelated under flipout (products are ±1 with mean 0;
    # 150·36 of them per pair, std ~0.017; bound 0.08 over all pairs' mean).
    delta = ratio - 1
    corr = (delta[:, 0] * delta[:, 1]).mean().item()
    assert abs(corr) < 0.08


def test_flipout_gaussian_effective_weight_distribution():
    torch.manual_seed(12)
    sigma = 0.8
    lstm = _probe_lstm(6, weight_noise=sigma, flipout=True)
    z = (_draws(lstm, 32, 150) - 1) / sigma                 # should be N(0, 1) per entry
    # Mean 0, variance 1 (σ²W² for the unnormalized perturbation). Per draw only 36 base
    # values ε exist (the examples see ±ε), so the variance estimate rests on 150·36 = 5400
    # squares: std ≈ sqrt(2/5400) ≈ 0.019; bound 0.1. The mean has std ≈ 1/sqrt(5400·...)
    # ≤ 0.014; bound 0.06.
    assert abs(z.mean().item()) < 0.06
    assert abs(z.var().item() - 1) < 0.1
    # Cross-example: E[z_n z_m] = 0 under flipout (sign product has mean 0; E[ε⁴] = 3 so
    # each product has variance 3; 5400 products: std ≈ 0.024; bound 0.12).
    assert abs((z[:, 0] * z[:, 1]).mean().item()) < 0.12
    assert abs((z[:, 0] * z[:, 0]).mean().item() - 1) < 0.1


@pytest.mark.parametrize("kw", [dict(weight_noise=0.8), dict(weight_drop=0.3)])
def test_shared_noise_same_for_all_examples_and_new_each_call(kw):
    torch.manual_seed(13)
    lstm = _probe_lstm(5, **kw)
    a = _draws(lstm, 4, 1)[0]
    b = _draws(lstm, 4, 1)[0]
    for n in range(1, 4):
        torch.testing.assert_close(a[n], a[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[0], b[0])
    if "weight_drop" in kw:
        keep = (a[0] - 1 / 0.7).abs() < 1e-9
        assert torch.all(keep | (a[0].abs() < 1e-9)) and 0 < keep.sum() < keep.numel()


def test_sample_noise_object():
    lstm = LSTM(5, 4, 2, weight_noise=0.5, input_weight_drop=0.5, flipout=True,
                hidden_dropout=0.2, zoneout_cell=0.3, cell_dropout=0.1,
                cell_dropout_per_step=False)
    noise = lstm.sample_noise(3)
    assert isinstance(noise, LSTMNoise) and noise.batch_size == 3 and noise.seq_len is None
    l0, l1 = noise.layers
    assert isinstance(l0, LayerNoise)
    assert l0.hh_delta.shape == (16, 4) and l0.ih_delta.shape == (16, 5)
    assert l1.ih_delta.shape == (16, 4)
    assert l0.hh_r.shape == (3, 16) and l0.hh_s.shape == (3, 4)
    assert l0.ih_r.shape == (3, 16) and l0.ih_s.shape == (3, 5)
    assert set(l0.hh_r.unique().tolist()) <= {-1.0, 1.0}
    assert set(l0.ih_delta.unique().tolist()) <= {-1.0, 1.0}        # ξ = ±1
    assert l0.hidden_mask.shape == (3, 4) and l0.cell_mask.shape == (3, 4)
    assert l0.zoneout_cell is None                                  # per step: needs seq_len
    full = lstm.sample_noise(3, seq_len=7)
    assert full.layers[0].zoneout_cell.shape == (7, 3, 4)
    # base=: the same base perturbations, fresh signs and masks.
    sub = lstm.sample_noise(5, base=noise)
    assert sub.layers[0].hh_delta is noise.layers[0].hh_delta
    assert sub.layers[1].ih_delta is noise.layers[1].ih_delta
    assert sub.layers[0].hh_r.shape == (5, 16)
    fresh = lstm.sample_noise(3, base=noise)
    assert not torch.equal(fresh.layers[0].hh_r, noise.layers[0].hh_r)


def test_fixed_noise_is_reproducible_and_ignored_in_eval():
    lstm = LSTM(3, 4, 2, dropout=0.0, weight_drop=0.5, flipout=True, zoneout_hidden=0.2,
                cell_dropout=0.3, dtype=DT)
    x = torch.randn(6, 2, 3, dtype=DT)
    noise = lstm.sample_noise(2, seq_len=6)
    a, _ = lstm(x, noise=noise)
    b, _ = lstm(x, noise=noise)
    c, _ = lstm(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    lstm.eval()
    e1, _ = lstm(x, noise=noise)
    e2, _ = lstm(x)
    assert torch.equal(e1, e2)


def test_per_step_masks_change_per_sequence_masks_do_not():
    lstm = LSTM(3, 8, 1, cell_dropout=0.5, zoneout_cell=0.5)
    n = lstm.sample_noise(4, seq_len=10).layers[0]
    assert n.cell_mask.shape == (10, 4, 8) and not torch.equal(n.cell_mask[0], n.cell_mask[1])
    assert not torch.equal(n.zoneout_cell[0], n.zoneout_cell[1])
    seq = LSTM(3, 8, 1, cell_dropout=0.5, cell_dropout_per_step=False, hidden_dropout=0.5)
    n = seq.sample_noise(4, seq_len=10).layers[0]
    assert n.cell_mask.shape == (4, 8) and n.hidden_mask.shape == (4, 8)


def _batch_mean_grads(flipout, N, draws, seed):
    """The batch-mean gradient of W_hh for ``draws`` draws of the noise, stacked.

    The batch is N copies of one sequence, so all of the variance comes from the weight
    noise (the paper's α is the per-example noise variance here, β = 0 data variance)."""
    torch.manual_seed(1234)                       # same model and sequence for every call
    lstm = LSTM(3, 8, 1, weight_noise=1.0, flipout=flipout, dtype=DT)
    x = torch.randn(5, 1, 3, dtype=DT).expand(5, N, 3)
    v = torch.randn(5, 1, 8, dtype=DT)
    torch.manual_seed(seed)
    grads = []
    for _ in range(draws):
        out, _ = lstm(x)
        grads.append(torch.autograd.grad((out * v).sum() / N, [lstm.weight_hh_l0])[0])
    return torch.stack(grads)


def test_gradient_variance_shared_flat_flipout_one_over_n():
    """Theorem 2 at β = 0, on the layer itself: Var_N = V_1/N + (N-1)/N·γ under flipout, V_1
    under shared noise. (The grad_variance experiment, tests/test_grad_variance.py, checks the
    slopes over N = 1..64 with data variance, through its own sub-batched noise.)

    Shared: all examples see one weight, so from the same seed N identical copies give
    exactly the N = 1 gradient, draw by draw (the draws differ: the noise is live).
    Flipout: a per-weight variance from K = 120 draws has relative std sqrt(2/119) ≈ 0.13
    and the average over the 256 weights is tighter, so the ratio of two independent
    estimates lies in [0.6, 1.6] with a wide margin; it must be within [0.5/N, 2/N] of 1/N
    (the γ term of this small model measured ≈ 0 here: 0.065 at N = 16, 0.017 at N = 64),
    which a variance that stayed flat, like shared's, fails by a factor of 8.
    """
    N, K = 16, 120
    g1 = _batch_mean_grads(False, 1, 8, seed=1)
    gn = _batch_mean_grads(False, N, 8, seed=1)
    torch.testing.assert_close(gn, g1, rtol=1e-12, atol=1e-14)
    assert g1.var(0).mean() > 1e-3 * g1.pow(2).mean()
    v1 = _batch_mean_grads(True, 1, K, seed=1).var(0).mean().item()
    vn = _batch_mean_grads(True, N, K, seed=2).var(0).mean().item()
    assert 0.5 / N < vn / v1 < 2.0 / N, vn / v1


@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (7,)])
def test_signs_are_the_bits_of_random_bytes(shape):
    """Entry 8j + k is +1 exactly where bit k of the j-th random byte is set, and drawing
    consumes one random byte per 8 entries (so the global RNG stream after it is fixed)."""
    from flipout_lstm.nn.noise import signs
    n = torch.Size(shape).numel()
    torch.manual_seed(3)
    got = signs(shape, device="cpu", dtype=DT)
    after = torch.rand(4)
    torch.manual_seed(3)
    octets = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8).tolist()
    expect = [1.0 if octets[i // 8] >> (i % 8) & 1 else -1.0 for i in range(n)]
    assert got.shape == shape and got.dtype == DT
    assert got.flatten().tolist() == expect
    assert torch.equal(torch.rand(4), after)
