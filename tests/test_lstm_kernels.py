"""The recurrence's kernel choice (lm.nn.kernels): every candidate gives the same numbers, the
choice is timed once and cached, it can be forced, and timing leaves the global RNG alone."""
import itertools
import json

import pytest
import torch

from lm.nn import LSTM, fused_cell, kernels, lstm_recurrence, recurrence

DT = torch.float64
T, B, H = 5, 3, 4

# (op, candidates) for each stage; "packed" only exists for float32 and is checked there.
CELLS = ["torch"] + (["fused"] if fused_cell.library() is not None else [])
SETTINGS = [dict(cell=c, fwd_pair=fp, bwd_pair=bp, fwd_product=fs, bwd_product="mm")
            for c, (fp, bp, fs) in itertools.product(CELLS, [("bmm", "mm", "mm"),
                                                              ("mm", "bmm", "mm")])]


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Every test starts with no choices, in memory or on disk (a file of its own)."""
    monkeypatch.setenv("LM_KERNEL_CHOICES", str(tmp_path / "choices.json"))
    kernels.clear()
    yield
    kernels.clear()


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


VARIANTS = ["plain", "flip", "gal", "zone", "sem", "zexp", "flip+gal+zone+sem", "gal+sem"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_candidates_agree_float64(variant):
    """Outputs and gradients of every kernel combination equal the torch-ops reference."""
    leaves, noise = _inputs(DT, variant, torch.Generator().manual_seed(1))
    with kernels.forced(cell="torch", fwd_pair="bmm", bwd_pair="bmm", fwd_product="mm",
                        bwd_product="mm"):
        ref = _run(leaves, noise)
    for setting in SETTINGS:
        with kernels.forced(**setting):
            got = _run(leaves, noise)
            assert recurrence.last_kernels["cell"] == setting["cell"]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=str(setting))


@pytest.mark.parametrize("kind", [
    pytest.param("packed", marks=pytest.mark.skipif(
        not recurrence._packed_available(torch.zeros(1)),
        reason="MKL packed products unavailable in this torch build")),
    pytest.param("onednn", marks=pytest.mark.skipif(
        not recurrence._onednn_available(torch.zeros(1)),
        reason="oneDNN matmul unavailable in this torch build"))])
@pytest.mark.parametrize("variant", ["flip+gal", "gal+zone"])
def test_float32_only_products_agree(variant, kind):
    leaves64, noise64 = _inputs(DT, variant, torch.Generator().manual_seed(2))
    leaves = [t.detach().float().requires_grad_(True) for t in leaves64]
    noise = [None if t is None else t.float() for t in noise64]
    with kernels.forced(cell="torch", fwd_pair="bmm", bwd_pair="bmm", fwd_product="mm",
                        bwd_product="mm"):
        ref = _run(leaves, noise)
    for cell in CELLS:
        with kernels.forced(cell=cell, fwd_pair=kind, bwd_pair=kind,
                            fwd_product=kind, bwd_product=kind):
            got = _run(leaves, noise)
            assert recurrence.last_kernels["fwd"] == kind
            assert recurrence.last_kernels["bwd"] == kind
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_choice_is_timed_once_then_cached(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    leaves, noise = _inputs(torch.float32, "flip", torch.Generator().manual_seed(3))
    before = kernels.tunings
    _run(leaves, noise)
    timed = kernels.tunings - before
    # fwd_pair and bwd_pair always have >1 candidate; the cell has 2 when compiled.
    assert timed >= 2
    chosen = kernels.choices()
    assert all(v in kernels.OPS[k[0]] for k, v in chosen.items())
    for key in chosen:
        if len(kernels.timings().get(key, {})) > 1:
            assert chosen[key] == min(kernels.timings()[key], key=kernels.timings()[key].get)
    _run(leaves, noise)
    assert kernels.tunings - before == timed          # second call: cache, no timing
    assert kernels.choices() == chosen
    # A new shape is a new key: timed again.
    leaves2, noise2 = _inputs(torch.float32, "flip", torch.Generator().manual_seed(3))
    leaves2 = [leaves2[0][:, :2].detach().requires_grad_(True)] + [
        t[:2].detach().requires_grad_(True) for t in leaves2[1:3]] + [leaves2[3]]
    noise2 = [noise2[0], noise2[1][:2], noise2[2][:2]] + list(noise2[3:])
    _run(leaves2, noise2)
    assert kernels.tunings - before > timed


def test_choices_persist_for_a_new_process(tmp_path, monkeypatch):
    """A later process (here: a cleared cache) takes the choices on disk without timing, so a
    resumed run uses the kernels of the interrupted one."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    leaves, noise = _inputs(torch.float32, "gal", torch.Generator().manual_seed(6))
    before = kernels.tunings
    _run(leaves, noise)
    assert kernels.tunings > before
    chosen = kernels.choices()
    on_disk = json.loads((tmp_path / "choices.json").read_text())
    assert {repr(k): v for k, v in chosen.items() if len(kernels.timings().get(k, {})) > 1} \
        .items() <= on_disk.items()
    # Tamper with the file: the next process must follow it, not re-time.
    # Gal's operations (cell, fwd_product, bwd_product) have two candidates each: a key on
    # disk was timed between both, so the other one is available too.
    key = sorted(on_disk)[0]
    op = key.split("'")[1]
    other = next(n for n in kernels.OPS[op] if n != on_disk[key])
    on_disk[key] = other
    (tmp_path / "choices.json").write_text(json.dumps(on_disk))
    kernels.clear()
    mid = kernels.tunings
    _run(leaves, noise)
    assert kernels.tunings == mid
    field = {"cell": "cell", "fwd_product": "fwd", "bwd_product": "bwd"}[op]
    assert recurrence.last_kernels[field] == other


def test_forcing_by_env_and_api(monkeypatch):
    leaves, noise = _inputs(DT, "flip", torch.Generator().manual_seed(4))
    monkeypatch.setenv(kernels.ENV, "cell=torch,fwd_pair=mm,bwd_pair=bmm")
    before = kernels.tunings
    _run(leaves, noise)
    assert recurrence.last_kernels == dict(cell="torch", fwd="mm", bwd="bmm")
    assert kernels.tunings == before                    # forced: nothing timed
    # The API overrides the environment; an unavailable name falls back to the default.
    with kernels.forced(fwd_pair="packed", cell="torch"):     # packed: float32 only
        _run(leaves, noise)
        assert recurrence.last_kernels["fwd"] == kernels.OPS["fwd_pair"][1]
    monkeypatch.setenv(kernels.ENV, "*=default")
    kernels.clear()
    _run(leaves, noise)
    assert kernels.tunings == before
    assert recurrence.last_kernels["fwd"] == "bmm"     # first available for float64
    monkeypatch.setenv(kernels.ENV, "cell")
    kernels.clear()
    with pytest.raises(ValueError, match="LM_LSTM_KERNELS"):
        _run(leaves, noise)
    with pytest.raises(ValueError, match="unknown kernel operation"):
        kernels.force(celll="torch")


@pytest.mark.parametrize("kw", [dict(weight_noise=1.0, flipout=True),
                                dict(zoneout_cell=0.3, hidden_dropout=0.2)])
def test_tuning_draws_nothing_from_the_global_rng(kw, monkeypatch):
    """Timing the candidates (first call with a new shape) must not move the global RNG, or
    an exactly resumed run would draw different noise than an uninterrupted one."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    torch.manual_seed(0)
    lstm = LSTM(6, 24, **kw)
    x = torch.randn(5, 4, 6)
    noise = lstm.sample_noise(4, seq_len=5)
    recurrence._packed_ok = recurrence._onednn_ok = None
    before_tunings = kernels.tunings
    state = torch.get_rng_state()
    lstm(x, noise=noise)[0].sum().backward()
    assert kernels.tunings > before_tunings              # it did time candidates
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(fused_cell.library() is None, reason="no C compiler: fused cell not built")
def test_fused_cell_is_cached_on_disk():
    """The compiled cell lives in the cache folder, and asking again reuses the file."""
    lib = fused_cell._build(fused_cell._compiler())
    assert lib.parent == fused_cell.cache_dir() and lib.is_file()
    stamp = lib.stat().st_mtime_ns
    assert fused_cell._build(fused_cell._compiler()) == lib
    assert lib.stat().st_mtime_ns == stamp                       # not rebuilt


def test_fused_cell_falls_back_without_compiler(monkeypatch, tmp_path):
    """No compiler: the library is None, the cell candidate is the torch one, results hold."""
    monkeypatch.setattr(fused_cell, "_tried", False)
    monkeypatch.setattr(fused_cell, "_lib", None)
    monkeypatch.setenv("LM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert fused_cell.library() is None
    assert fused_cell.build_error
    leaves, noise = _inputs(DT, "gal", torch.Generator().manual_seed(5))
    _run(leaves, noise)
    assert recurrence.last_kernels["cell"] == "torch"
