"""The recurrence's kernels: the compiled cell and the torch-ops cell, and oneDNN and ``mm``
products, give the same numbers; the choice is a fixed rule, not a timing race; and choosing
draws nothing from the global RNG."""
import itertools

import pytest
import torch

from flipout_lstm.nn import LSTM, fused_cell, lstm_recurrence, products, recurrence

DT = torch.float64
T, B, H = 5, 3, 4

CELLS = ["torch"] + (["fused"] if fused_cell.library() is not None else [])
ONEDNN = products.uses_onednn(torch.device("cpu"), torch.float32)     # the rule, on this CPU
BIG = products.STEP_WEIGHT_BYTES // 4                                  # a per-step weight, elements
ONEDNN_RUNS = products.onednn_available(torch.float32)                  # the op, in this build


def _inputs(dtype, variant, gen):
    g = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    bern = lambda s, p: (torch.rand(*s, generator=gen, dtype=dtype) < p).to(dtype)  # noqa: E731
    xp, h0, c0, w = g(T, B, 4 * H), g(B, H), g(B, H), g(4 * H, H) * 0.5
    for t in (xp, h0, c0, w):
        t.requires_grad_(True)
    e = r = s = m = zc = zh = cm = None
    if "flip" in variant:
        e = g(4 * H, H) * 0.7
        r, s = bern((B, 4 * H), 0.5) * 2 - 1, bern((B, H), 0.5) * 2 - 1
    if "gal" in variant:
        m = bern((B, H), 0.7) / 0.7
    if "zone" in variant:
        zc, zh = bern((T, B, H), 0.4), bern((T, B, H), 0.2)
    if "zexp" in variant:
        zc = torch.full((1, 1, 1), 0.4, dtype=dtype).expand(T, B, H)
    if "sem" in variant:
        cm = bern((T, B, H), 0.7) / 0.7
    return (xp, h0, c0, w), (e, r, s, m, zc, zh, cm)


def _run(leaves, noise):
    out, hn, cn = lstm_recurrence(*leaves, *noise)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
        + (hn * 0.3).sum() + (cn * 0.7).sum()
    return [out, hn, cn] + list(torch.autograd.grad(loss, leaves))


def _with(monkeypatch, cell=None, onednn=None):
    """Pin the cell ("torch" or "fused") and whether products use oneDNN (on any CPU ISA)."""
    if cell == "torch":
        monkeypatch.setattr(fused_cell, "supports", lambda *a, **k: False)
    if onednn is not None:
        monkeypatch.setattr(products, "uses_onednn", lambda device, dtype, step_weight=0: (
            onednn and products.onednn_runs(device, dtype)))


VARIANTS = ["plain", "flip", "gal", "zone", "sem", "zexp", "flip+gal+zone+sem", "gal+sem"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cells_agree(variant, dtype, monkeypatch):
    """The compiled cell and the torch-ops cell: outputs and gradients equal (float64 to
    rounding, float32 to 1e-5)."""
    if "fused" not in CELLS:
        pytest.skip(f"compiled cell unavailable: {fused_cell.build_error}")
    leaves, noise = _inputs(dtype, variant, torch.Generator().manual_seed(1))
    got = _run(leaves, noise)
    assert recurrence.last_kernels["cell"] == "fused"
    with monkeypatch.context() as mp:
        _with(mp, cell="torch")
        ref = _run(leaves, noise)
        assert recurrence.last_kernels["cell"] == "torch"
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("variant", ["plain", "flip+gal+zone+sem"])
def test_cells_agree_on_bfloat16_products(variant, monkeypatch):
    """Mixed precision: both cells widen the bfloat16 products as they read them, so they
    agree to float32 rounding (the products themselves are the same)."""
    if "fused" not in CELLS:
        pytest.skip(f"compiled cell unavailable: {fused_cell.build_error}")
    leaves, noise = _inputs(torch.float32, variant, torch.Generator().manual_seed(8))

    def run():
        out, hn, cn = lstm_recurrence(*leaves, *noise, dtype=torch.bfloat16)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + hn.sum() + cn.sum()
        return [out, hn, cn] + list(torch.autograd.grad(loss, leaves))
    got = run()
    assert recurrence.last_kernels["cell"] == "fused"
    with monkeypatch.context() as mp:
        _with(mp, cell="torch")
        ref = run()
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ONEDNN_RUNS, reason="oneDNN matmul unavailable in this torch build")
@pytest.mark.parametrize("variant", ["flip+gal", "gal+zone", "plain"])
@pytest.mark.parametrize("cell", CELLS)
def test_onednn_and_mm_products_agree(variant, cell, monkeypatch):
    """float32: oneDNN (the rule on AVX-512 CPUs) against ``mm`` / ``bmm`` (the rule on AVX2
    and elsewhere), each pinned, so both paths are tested on either CPU."""
    leaves64, noise64 = _inputs(DT, variant, torch.Generator().manual_seed(2))
    leaves = [t.detach().float().requires_grad_(True) for t in leaves64]
    noise = [None if t is None else t.float() for t in noise64]
    _with(monkeypatch, cell=cell, onednn=True)
    got = _run(leaves, noise)
    assert recurrence.last_kernels["products"] == "onednn"
    with monkeypatch.context() as mp:
        _with(mp, onednn=False)
        ref = _run(leaves, noise)
        assert recurrence.last_kernels["products"] == "mm"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_rule(monkeypatch):
    """oneDNN for CPU bfloat16, the per-step float32 products against a weight of 2 MiB or
    more everywhere and every float32 product on AVX-512, where its probe passes; ``mm`` for
    everything else; nothing is timed (the choice runs with every clock broken) and it is
    fixed: asking again, or after forward calls, gives the same answer, and the recurrence
    reports it."""
    cpu = torch.device("cpu")
    for device, dtype in [(cpu, torch.float64), (cpu, torch.float16),
                          (torch.device("cuda"), torch.float32),
                          (torch.device("cuda"), torch.bfloat16)]:
        assert not products.uses_onednn(device, dtype) and products.kernel_name(device, dtype) == "mm"
        assert not products.uses_onednn(device, dtype, step_weight=BIG)
    # This torch build has oneDNN's matmul: float32's per-step products against a large
    # weight take it on every CPU, the rest only on AVX-512.
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert ONEDNN_RUNS
    assert ONEDNN == (ONEDNN_RUNS and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
    assert products.uses_onednn(cpu, torch.float32, step_weight=BIG) == ONEDNN_RUNS

    def no_clock(*a):
        raise AssertionError("the kernel rule must not time anything")
    monkeypatch.setattr(products, "_onednn_ok", {})
    for name in ("perf_counter", "perf_counter_ns", "process_time", "monotonic"):
        monkeypatch.setattr(f"time.{name}", no_clock)
    assert products.kernel_name(cpu, torch.float32) == ("onednn" if ONEDNN else "mm")
    leaves, noise = _inputs(torch.float32, "flip", torch.Generator().manual_seed(3))
    for _ in range(2):
        _run(leaves, noise)
        assert recurrence.last_kernels == {"products": "onednn" if ONEDNN else "mm",
                                           "cell": CELLS[-1]}
    monkeypatch.undo()
    leaves, noise = _inputs(DT, "flip", torch.Generator().manual_seed(3))
    _run(leaves, noise)
    assert recurrence.last_kernels["products"] == "mm"


@pytest.mark.parametrize("isa", ["AVX2", "AVX512", "DEFAULT"])
def test_the_rule_follows_the_cpu_isa(isa, monkeypatch):
    """float32's per-step products against a weight of 2 MiB or more take oneDNN on every
    ISA, every other float32 product only where torch's CPU kernels are AVX-512 (on AVX2,
    MKL's ``mm`` is the faster for them: docs/performance.md); bfloat16 takes oneDNN
    wherever it runs; the layer's products follow, and the recurrence reports the pair."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    cpu = torch.device("cpu")
    assert products.uses_onednn(cpu, torch.float32) == (isa == "AVX512" and ONEDNN_RUNS)
    avx512 = isa == "AVX512" and ONEDNN_RUNS
    assert products.uses_onednn(cpu, torch.float32, step_weight=BIG) == ONEDNN_RUNS
    assert products.uses_onednn(cpu, torch.float32, step_weight=BIG - 1) == avx512
    small, big = torch.zeros(8, 2), torch.zeros(BIG // 512, 512)   # 64 B and 2 MiB
    assert products.Pair(torch.stack([big, big]), 3).onednn == ONEDNN_RUNS
    assert products.Linear(big, 3).onednn == ONEDNN_RUNS
    assert products.Pair(torch.stack([small, small]), 3).onednn == avx512
    assert products.Linear(small, 3).onednn == avx512
    assert products.kernel_name(cpu, torch.float32, step_weight=BIG) == (
        "mm" if not ONEDNN_RUNS else "onednn" if isa == "AVX512" else "onednn+mm")
    assert products.kernel_name(cpu, torch.float32) == ("onednn" if avx512 else "mm")
    assert products.uses_onednn(cpu, torch.bfloat16) == products.onednn_available(torch.bfloat16)
    leaves, noise = _inputs(torch.float32, "flip", torch.Generator().manual_seed(5))
    _run(leaves, noise)
    assert recurrence.last_kernels["products"] == (          # H = 4: a 256-byte weight
        "onednn" if avx512 else "mm")
    # With the threshold under that weight, the recurrence's per-step products (its Pair,
    # forward and backward) switch and it says so: it hands the rule its weight's size.
    monkeypatch.setattr(products, "STEP_WEIGHT_BYTES", 4 * 4 * H * H)
    seen = []
    real_pair = products.Pair.__init__

    def spy(self, m, batch, dtype=None):
        real_pair(self, m, batch, dtype)
        seen.append(self.onednn)
    monkeypatch.setattr(products.Pair, "__init__", spy)
    _run(leaves, noise)
    assert seen == [ONEDNN_RUNS, ONEDNN_RUNS]                 # the forward and backward pair
    assert recurrence.last_kernels["products"] == (
        "mm" if not ONEDNN_RUNS else "onednn" if avx512 else "onednn+mm")


@pytest.mark.skipif(not ONEDNN_RUNS, reason="oneDNN matmul unavailable in this torch build")
@pytest.mark.parametrize("fault", ["missing", "wrong"])
def test_a_failed_onednn_probe_falls_back_to_mm(fault, monkeypatch):
    """The op missing from the build (it raises), or giving wrong numbers on the probe's fixed
    values: the rule is ``mm``, and the recurrence runs on it with the same results."""
    leaves, noise = _inputs(torch.float32, "flip+gal", torch.Generator().manual_seed(4))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    ref = _run(leaves, noise)
    assert recurrence.last_kernels["products"] == "onednn"
    real = products._onednn_lp()

    def broken():
        if fault == "missing":
            raise AttributeError("no _linear_pointwise in this build")
        return lambda *a: real(*a) * 1.01
    monkeypatch.setattr(products, "_onednn_lp", broken)
    monkeypatch.setattr(products, "_onednn_ok", {})
    assert not products.uses_onednn(torch.device("cpu"), torch.float32)
    assert not products.uses_onednn(torch.device("cpu"), torch.float32, step_weight=BIG)
    got = _run(leaves, noise)
    assert recurrence.last_kernels["products"] == "mm"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(weight_noise=1.0, flipout=True),
                                dict(zoneout_cell=0.3, hidden_dropout=0.2)])
def test_kernel_probes_draw_nothing_from_the_global_rng(kw, monkeypatch):
    """Exact resume needs every random draw to come from the saved RNG streams in order, so
    a forward and backward with pinned noise must draw nothing, the first call of a process
    included: there the oneDNN probe runs and the compiled cell is loaded and self-checked
    (both are reset here, as in a fresh process; the cell is not recompiled)."""
    lib = fused_cell.library()

    def build():                                           # the first use, minus the compiler
        if lib is None:
            raise RuntimeError(fused_cell.build_error)
        return lib
    monkeypatch.setattr(fused_cell, "_build", build)
    monkeypatch.setattr(fused_cell, "_tried", False)
    monkeypatch.setattr(fused_cell, "_lib", None)
    monkeypatch.setattr(products, "_onednn_ok", {})
    # An AVX-512 CPU's rule, where float32 asks the probe (on AVX2 it would not run for float32).
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    torch.manual_seed(0)
    lstm = LSTM(6, 24, **kw)
    x = torch.randn(5, 4, 6)
    noise = lstm.sample_noise(4, seq_len=5)
    state = torch.get_rng_state()
    lstm(x, noise=noise)[0].sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    assert fused_cell._tried and fused_cell._lib is lib            # the cell's first use ran
    assert list(products._onednn_ok) == [torch.float32]            # and the probe did
    assert recurrence.last_kernels == {"products": "onednn" if ONEDNN_RUNS else "mm",
                                       "cell": CELLS[-1]}


def test_fused_cell_falls_back_without_a_build(monkeypatch):
    """The build fails (no compiler, say): the module is None, the cell is the torch one, and
    the results hold."""
    monkeypatch.setattr(fused_cell, "_tried", False)
    monkeypatch.setattr(fused_cell, "_lib", None)
    monkeypatch.setattr(fused_cell, "build_error", None)

    def no_compiler():
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(fused_cell, "_build", no_compiler)
    assert fused_cell.library() is None
    assert "no C++ compiler" in fused_cell.build_error
    leaves, noise = _inputs(DT, "gal", torch.Generator().manual_seed(5))
    _run(leaves, noise)
    assert recurrence.last_kernels["cell"] == "torch"


def test_fused_cell_switched_off_by_env(monkeypatch):
    """``LM_FUSED_CELL=0``: no module, the reason recorded, and the recurrence takes the
    torch-ops cell."""
    monkeypatch.setattr(fused_cell, "_tried", False)
    monkeypatch.setattr(fused_cell, "_lib", None)
    monkeypatch.setattr(fused_cell, "build_error", None)
    monkeypatch.setenv("LM_FUSED_CELL", "0")
    assert fused_cell.library() is None and "LM_FUSED_CELL=0" in fused_cell.build_error
    _run(*_inputs(DT, "zone", torch.Generator().manual_seed(6)))
    assert recurrence.last_kernels["cell"] == "torch"


@pytest.mark.skipif("fused" not in CELLS, reason="compiled cell unavailable")
def test_fused_cell_every_option_against_torch_ops():
    """Each compiled instance (the options are template constants) against TorchCell on one
    step, float64: forward, backward and post, with and without each optional operand."""
    gen = torch.Generator().manual_seed(7)
    Bc, Hc = 3, 5
    G = 4 * Hc
    g = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    xp, p0, p1, r = g(Bc, G), g(Bc, G), g(Bc, G), torch.sign(g(Bc, G))
    c0, h0, cm, m, ms = g(Bc, Hc), g(Bc, Hc), g(Bc, Hc), g(Bc, Hc), g(Bc, Hc)
    zc, zh = g(Bc, Hc).sigmoid(), g(Bc, Hc).sigmoid()
    cells = (fused_cell.FusedCell(), recurrence.TorchCell(xp, Bc, Hc))
    for flip, grad, noise, hm, hs in itertools.product([0, 1], repeat=5):
        outs = []
        for cell in cells:
            acts, k, dg, dgr = (torch.zeros(Bc, G, dtype=DT) for _ in range(4))
            c1, h1, kc, hn, hsn, dcp, dhp = (torch.zeros(Bc, Hc, dtype=DT) for _ in range(7))
            cell.fwd(Bc, Hc, xp, p0, p1 if flip else None, r if flip else None, acts, c0, h0,
                     cm if noise else None, zc if noise else None, zh if noise else None, c1, h1,
                     k if grad else None, kc if grad else None, m if hm else None,
                     hn if hm else None, ms if hs else None, hsn if hs else None)
            if grad:
                cell.bwd(Bc, Hc, h1, c1, k, kc, acts, zc if noise else None, dg,
                         r if flip else None, dgr if flip else None, dcp)
                cell.post(Bc * Hc, acts[:, :Hc].contiguous(), m if hm else None,
                          acts[:, Hc:2 * Hc].contiguous() if flip else None, ms,
                          zh if noise else None, h1, h0 if hs else None, dhp)
            outs.append([acts, c1, h1, k, kc, hn, hsn, dg, dgr, dcp, dhp])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13,
                                       msg=f"flip={flip} grad={grad} noise={noise} hm={hm} hs={hs}")
