"""The recurrence's pooled buffers (flipout_lstm.nn.workspace): reused between calls, never while a
graph, an output or a gradient still refers to them, and bounded under varying lengths."""
import pytest
import torch

from flipout_lstm.nn import lstm_recurrence, workspace

pytestmark = pytest.mark.skipif(not workspace.enabled(), reason="no storage use count here")
T, B, H = 6, 3, 5


@pytest.fixture(autouse=True)
def _small_pool(monkeypatch):
    """Pool every buffer of these small shapes; each test starts with an empty pool."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    workspace.clear()
    yield
    workspace.clear()


def _leaves(seed, steps=T, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(steps, B, 4 * H, generator=g, dtype=dtype).requires_grad_(True)
    h0, c0 = (torch.randn(B, H, generator=g, dtype=dtype).requires_grad_(True) for _ in "hc")
    w = (torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    e = torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.7
    r = torch.randint(0, 2, (B, 4 * H), generator=g).to(dtype) * 2 - 1
    s = torch.randint(0, 2, (B, H), generator=g).to(dtype) * 2 - 1
    return (xp, h0, c0, w), (e, r, s)


def _grads(leaves, noise):
    out, hn, cn = lstm_recurrence(*leaves, *noise)
    loss = (out * out).sum() + hn.sum() + cn.sum()
    return [out.detach().clone()] + [g.clone() for g in torch.autograd.grad(loss, leaves)]


def _reference(seed, monkeypatch, steps=T):
    monkeypatch.setenv("LM_LSTM_WORKSPACE", "0")
    ref = _grads(*_leaves(seed, steps))
    monkeypatch.delenv("LM_LSTM_WORKSPACE")
    return ref


def test_buffers_are_reused_and_results_unchanged(monkeypatch):
    ref = _reference(1, monkeypatch)
    assert workspace.pooled_bytes() == 0                   # switched off: nothing pooled
    first = _grads(*_leaves(1))
    held = workspace.pooled_bytes()
    assert held > 0
    for _ in range(3):                                     # dirty buffers, same numbers
        again = _grads(*_leaves(1))
        assert workspace.pooled_bytes() == held
        for a, b in zip(again, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(first, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_retained_graph_keeps_its_buffers(monkeypatch):
    """Backward twice through a kept graph, with other calls in between: the second backward
    still sees the first call's saved tensors, not the later calls' data."""
    ref = _reference(2, monkeypatch)
    leaves, noise = _leaves(2)
    out, hn, cn = lstm_recurrence(*leaves, *noise)
    loss = (out * out).sum() + hn.sum() + cn.sum()
    g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    for seed in (3, 4):
        _grads(*_leaves(seed))                             # would overwrite shared buffers
    g2 = torch.autograd.grad(loss, leaves)
    for a, b, r in zip(g1, g2, ref[1:]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
        torch.testing.assert_close(b, r, rtol=0, atol=0)


def test_kept_outputs_and_gradients_are_not_overwritten(monkeypatch):
    ref = _reference(5, monkeypatch)
    leaves, noise = _leaves(5)
    out, hn, cn = lstm_recurrence(*leaves, *noise)
    ((out * out).sum() + hn.sum() + cn.sum()).backward()
    grads = [t.grad for t in leaves]                       # d xproj may be a pooled view
    for seed in (6, 7):
        _grads(*_leaves(seed))
    torch.testing.assert_close(out.detach(), ref[0], rtol=0, atol=0)
    for a, b in zip(grads, ref[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_varying_lengths_share_a_bounded_pool(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_BUFFERS", 12)
    sizes = []
    for steps in list(range(40, 48)) * 2:                  # variable BPTT lengths
        _grads(*_leaves(8, steps))
        sizes.append(len(workspace._pool))
    assert max(sizes) <= 12
    assert sizes[8:] == [sizes[7]] * 8                     # the second pass allocates nothing


def test_a_full_pool_drops_its_oldest_free_buffers(monkeypatch):
    """Beyond MAX_BUFFERS the oldest free bases go (in-use ones stay), and results hold."""
    monkeypatch.setattr(workspace, "MAX_BUFFERS", 3)
    like = torch.zeros(1)
    kept = workspace.empty((100,), like)                   # in use throughout
    for n in (1000, 3000, 9000, 27000):                    # sizes no earlier base can serve
        workspace.empty((n,), like)
        assert len(workspace._pool) <= 3
    assert any(b.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
               for b in workspace._pool)                   # the buffer in use was not dropped
    assert sorted(b.numel() for b in workspace._pool) == [112, 10240, 28672]   # rounded up
    ref = _reference(9, monkeypatch)
    for a, b in zip(_grads(*_leaves(9)), ref):             # and the recurrence still works
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_small_and_cuda_buffers_are_not_pooled(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 1 << 20)
    t = workspace.empty((10, 10), torch.zeros(1))
    assert t.shape == (10, 10) and workspace.pooled_bytes() == 0
    big = workspace.empty((512, 1024), torch.zeros(1, dtype=torch.float32))
    assert big.shape == (512, 1024) and workspace.pooled_bytes() >= 512 * 1024 * 4
