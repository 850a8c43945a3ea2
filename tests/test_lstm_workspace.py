"""The recurrence's pooled buffers (flipout_lstm.nn.workspace): reused between calls, never while a
graph, an output or a gradient still refers to them, and bounded under varying lengths."""
import pytest
import torch

from flipout_lstm.nn import lstm_recurrence, workspace

pytestmark = pytest.mark.skipif(not workspace.enabled(), reason="no storage use count here")
T, B, H = 6, 3, 5
MIN_BYTES = workspace.MIN_BYTES                            # the real threshold (fixture: 1)


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


def test_kept_graphs_outputs_and_gradients_are_not_overwritten(monkeypatch):
    """Later calls run while one call's graph is kept (``retain_graph=True``) and another's
    graph is freed but its output and gradients are kept (``d xproj`` may be a pooled view):
    neither call's buffers are handed out again. The kept graph's second backward sees its own
    saved tensors, and every kept output and gradient still holds its own numbers."""
    ref_a, ref_b = _reference(2, monkeypatch), _reference(5, monkeypatch)
    leaves_a, noise_a = _leaves(2)
    out_a, hn, cn = lstm_recurrence(*leaves_a, *noise_a)
    loss_a = (out_a * out_a).sum() + hn.sum() + cn.sum()
    g1 = torch.autograd.grad(loss_a, leaves_a, retain_graph=True)
    leaves_b, noise_b = _leaves(5)
    out_b, hn, cn = lstm_recurrence(*leaves_b, *noise_b)
    ((out_b * out_b).sum() + hn.sum() + cn.sum()).backward()          # frees b's graph
    grads_b = [t.grad for t in leaves_b]
    for seed in (3, 4, 6, 7):
        _grads(*_leaves(seed))                             # would overwrite shared buffers
    g2 = torch.autograd.grad(loss_a, leaves_a)
    torch.testing.assert_close(out_a.detach(), ref_a[0], rtol=0, atol=0)
    for a, b, r in zip(g1, g2, ref_a[1:]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
        torch.testing.assert_close(b, r, rtol=0, atol=0)
    torch.testing.assert_close(out_b.detach(), ref_b[0], rtol=0, atol=0)
    for a, r in zip(grads_b, ref_b[1:]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


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


def test_small_cpu_buffers_are_not_pooled(monkeypatch):
    """Below MIN_BYTES, counted in bytes of the requested dtype, a CPU buffer comes from
    ``new_empty`` and the pool stays empty; from MIN_BYTES on it is pooled (and reused once
    free). At its real threshold the small shapes of these tests pool nothing."""
    monkeypatch.setattr(workspace, "MIN_BYTES", MIN_BYTES)
    f32 = torch.zeros(1)
    small = MIN_BYTES // 4 - 1                             # one float32 short of MIN_BYTES
    for shape, like, dtype in [((small,), f32, None), ((10, 10), f32, None),
                               ((MIN_BYTES // 4,), f32, torch.bfloat16),   # half as many bytes
                               ((MIN_BYTES // 4,), torch.zeros(1, dtype=torch.bfloat16), None)]:
        t = workspace.empty(shape, like, dtype)
        assert t.shape == shape and t.dtype == (dtype or like.dtype) and t.device == like.device
        assert workspace.pooled_bytes() == 0 and not workspace._pool, (shape, dtype)
    _grads(*_leaves(1))                                    # (6, 3, 20) float64: 2880 bytes
    assert workspace.pooled_bytes() == 0
    big = workspace.empty((MIN_BYTES // 8,), f32, torch.float64)          # exactly MIN_BYTES
    assert big.dtype == torch.float64 and workspace.pooled_bytes() == MIN_BYTES
    ptr = big.untyped_storage().data_ptr()
    del big
    again = workspace.empty((MIN_BYTES // 8,), f32, torch.float64)
    assert again.untyped_storage().data_ptr() == ptr and workspace.pooled_bytes() == MIN_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_buffers_are_not_pooled(monkeypatch):
    """CUDA tensors come from torch's caching allocator: never pooled, whatever their size
    (MIN_BYTES is 1 here), from :func:`workspace.empty` or from the recurrence on the GPU."""
    cuda = torch.zeros(1, device="cuda")
    for shape in [(512, 1024), (4,)]:
        t = workspace.empty(shape, cuda)
        assert t.shape == shape and t.device == cuda.device and t.dtype == torch.float32
    assert workspace.pooled_bytes() == 0 and not workspace._pool
    leaves, noise = _leaves(1, dtype=torch.float32)
    leaves = [x.detach().to("cuda").requires_grad_(True) for x in leaves]
    noise = [x.to("cuda") for x in noise]
    out = _grads(leaves, noise)
    assert out[0].is_cuda and workspace.pooled_bytes() == 0 and not workspace._pool
