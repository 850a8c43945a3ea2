"""Speed of ``flipout_lstm.nn.LSTM``'s variants relative to ``torch.nn.LSTM``, in one process.

    python benchmarks/lstm_speed.py [--shape char|word|both] [--repeats N] [--quick]
                                    [--no-independent] [--threads N] [--clock wall|cpu]
                                    [--device cpu|cuda] [--precision fp32|bf16|fp16]

Prints where it ran (CPU model, its vector ISA read from ``/proc/cpuinfo``: AVX2, AVX-512,
AMX; threads; whether freed memory is kept in the heap, as train.py keeps it, for both sides
alike (flipout_lstm/heap.py); ``MKL_ENABLE_INSTRUCTIONS`` / ``ONEDNN_MAX_CPU_ISA`` /
``LM_FUSED_CELL`` / ``LM_KEEP_FREED_MEMORY`` if set), then one markdown table per shape:
forward+backward time of each variant (eval: forward only, against ``torch.nn.LSTM``'s eval
forward), its ratio to ``torch.nn.LSTM``, the target ratio, pass/fail and the kernels the
custom recurrence used (its products by ``flipout_lstm.nn.products``' fixed rule and its cell;
"oneDNN" where the variant runs torch's fused kernel). After a warm-up, each repeat times the
variant and ``torch.nn.LSTM`` back to back (alternating which goes first); the table shows the
median time and the median of the per-repeat ratios, so load from other processes on a shared
machine mostly cancels.
``--clock cpu`` times with this process's CPU time instead of the wall clock: on a core that
another process shares, the time it is descheduled then does not count (caches it evicts
still do), which keeps the paired ratios close where the wall clock scatters them.

Shapes are the paper's: character (batch 32, 100 steps, one-hot 50 -> 1000, one layer) and
word (batch 40, 35 steps, 650 -> 650, two layers). ``--quick`` uses tiny shapes (smoke test).
Extra rows: bayesian-torch's ``LSTMFlipout`` (character shape, when installed; it keeps a
fresh weight per step, so it runs over ``--bayesian-steps`` steps in a memory-capped child
process and is scaled to 100) and fully independent per-example weights (``torch.bmm`` per
step under autograd, one weight matrix per example), the cost that flipout avoids; the
latter is timed once, it is slow.

``--device cuda`` builds the models and inputs on the GPU and synchronizes before and after
each timed call (the bayesian-torch row, CPU-bound and memory-hungry, is skipped there;
``--clock cpu`` is refused, the GPU's time is not this process's CPU time). ``--precision``
runs every timed call, ``torch.nn.LSTM``'s included, under :func:`flipout_lstm.precision.autocast`
(``bf16``: only where bfloat16 is native, ``fp16``: CUDA only, as ``train.precision``); the
GEMM floor's operands are then in that dtype. The default, ``cpu`` and ``fp32``, is the
float32 benchmark the targets were set on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flipout_lstm import heap  # noqa: E402
from flipout_lstm import precision as lm_precision  # noqa: E402
from flipout_lstm.config import resolve_device  # noqa: E402
from flipout_lstm.errors import ConfigError  # noqa: E402
from flipout_lstm.nn import LSTM  # noqa: E402
from flipout_lstm.nn import cpuinfo, fused_cell, products, recurrence  # noqa: E402

SHAPES = {
    # name: (batch, steps, input, hidden, layers, index_input)
    "char": (32, 100, 50, 1000, 1, True),
    "word": (40, 35, 650, 650, 2, False),
    "quick": (4, 6, 5, 8, 2, False),
}

# name: (constructor kwargs, target ratio)
VARIANTS = {
    "none": ({}, 1.1),
    "WD shared": (dict(weight_drop=0.5), 1.1),
    "Gauss shared": (dict(weight_noise=1.0), 1.1),
    "WD+flipout": (dict(weight_drop=0.5, flipout=True), 2.0),
    "Gauss+flipout": (dict(weight_noise=1.0, flipout=True), 2.0),
    "Gal": (dict(hidden_dropout=0.25), 1.3),
    "zoneout": (dict(zoneout_cell=0.5, zoneout_hidden=0.05), 1.3),
    "Semeniuta": (dict(cell_dropout=0.25), 1.3),
}

ENV_VARS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "LM_FUSED_CELL",
            "LM_KEEP_FREED_MEMORY", "OMP_NUM_THREADS")


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def machine() -> str:
    """One line: CPU model, vector ISA, threads, torch, the heap's setting and the env vars
    that limit or change these."""
    cpu = cpuinfo.cpu()
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), *cpuinfo.BF16_FLAGS.items())
           if flag in cpu.flags] or ["no AVX2"]
    env = [f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ]
    cell = ("compiled cell available" if fused_cell.library() is not None
            else f"compiled cell unavailable ({fused_cell.build_error})")
    return (f"CPU: {cpu.name} ({os.cpu_count()} logical CPUs); ISA: {' + '.join(isa)}; "
            f"torch {torch.__version__}, {_threads()}; {cell}; "
            + ("freed memory kept" if heap.kept() else "glibc heap defaults")
            + (f"; env: {' '.join(env)}" if env else ""))


def _kernels_used(fn):
    """Run ``fn`` once; the custom recurrence's kernels it used, or "oneDNN" if none."""
    recurrence.last_kernels.clear()
    _run(fn)
    k = dict(recurrence.last_kernels)
    if not k:
        return "oneDNN (torch fused)"
    return " ".join(f"{n}={k[n]}" for n in ("products", "cell") if n in k)


def _inputs(shape, index):
    B, T, I, H, L, _ = shape
    if index:
        return torch.randint(0, I, (T, B)).to(_device)
    return torch.randn(T, B, I).to(_device)


def _dense(x, I):
    return torch.nn.functional.one_hot(x, I).float() if not x.is_floating_point() else x


def _fwd_bwd(model, x):
    def step():
        for p in model.parameters():
            p.grad = None
        out, (h, c) = model(x)
        out.sum().backward()
    return step


def _independent_step(ref, x, sigma=1.0):
    """Per-example weights W_n = W ∘ (1 + σ ε_n): one (4H, H) matrix per example, bmm per step."""
    w_ih, w_hh, b_ih, b_hh = ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0
    T, B = x.shape[:2]
    H = ref.hidden_size

    def step():
        for p in ref.parameters():
            p.grad = None
        eps = torch.randn(B, *w_hh.shape, device=w_hh.device)
        w_n = (w_hh * (1 + sigma * eps)).transpose(1, 2)          # (B, H, 4H)
        xp = (x.reshape(T * B, -1) @ w_ih.t() + b_ih + b_hh).view(T, B, 4 * H)
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        outs = []
        for t in range(T):
            a = xp[t] + torch.bmm(h.unsqueeze(1), w_n).squeeze(1)
            i, f, g, o = a.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        torch.stack(outs).sum().backward()
    return step


def _bayesian_torch_child(steps, repeats):
    """Child process: time bayesian-torch's LSTMFlipout fwd+bwd at the character shape."""
    from bayesian_torch.layers import LSTMFlipout  # type: ignore
    B, _, I, H, _, _ = SHAPES["char"]
    torch.manual_seed(0)
    model = LSTMFlipout(I, H)
    x = torch.nn.functional.one_hot(torch.randint(0, I, (B, steps)), I).float()   # batch-first

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(x)[0]
        out.sum().backward()
    _run(step)
    print(statistics.median(_time(step) for _ in range(repeats)))


def _bayesian_torch_time(steps, repeats):
    """Seconds per fwd+bwd of LSTMFlipout over ``steps`` steps, or a reason it has none.

    It draws a fresh (4H, H) perturbation at every step and keeps each for backward
    (~240 MB a step at the character shape), so it runs in a child process capped at half
    of the available memory: an out-of-memory failure cannot take this process down.
    """
    try:
        import importlib.util
        if importlib.util.find_spec("bayesian_torch") is None:
            return None, "bayesian-torch is not installed: LSTMFlipout row skipped."
    except Exception:  # noqa: BLE001
        return None, "bayesian-torch is not importable: LSTMFlipout row skipped."
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass

    def limit():
        if avail:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (avail // 2, avail // 2))

    cmd = [sys.executable, __file__, "--bayesian-child", str(steps), "--repeats", str(repeats),
           "--precision", _precision]
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=1800)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:120]
        return None, f"bayesian-torch LSTMFlipout failed at {steps} steps ({tail})."
    return float(res.stdout.strip().splitlines()[-1]), None


def _product_floor(shape, dtype=torch.float32):
    """A step of flipout's matrix products and nothing else: per layer the input projection
    and its two gradients, then per time step the forward pair ``(h̃, h̃∘s) (W̄, ΔŴ)ᵀ`` and
    the backward pair ``(δa, δa∘r) (W̄, ΔŴ)``, then the weight gradients of the pair over all
    steps. Two kernel families, the faster one counts: torch's ``mm`` / ``bmm`` (MKL on the
    CPU; the per-step pairs as one ``bmm`` or two ``mm``, whichever is faster), and the
    layer's own rule (:mod:`flipout_lstm.nn.products`: oneDNN or ``mm`` per product). No cell,
    no noise, no autograd: a lower bound for any implementation built on these kernels (the
    character shape's first layer even counts the input products that its one-hot lookup
    avoids), so its ratio to ``torch.nn.LSTM`` says how far below it the flipout target can be met.
    Under ``--precision`` bf16/fp16 its operands are in that dtype, on ``--device``.
    Returns the step and a function naming the family that won."""
    B, T, I, H, L, _ = shape
    G = 4 * H
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T * B, I, generator=gen)
    w_ih = [torch.randn(G, I if l == 0 else H, generator=gen) for l in range(L)]
    w2 = torch.randn(2, G, H, generator=gen)
    z, d = torch.randn(2, B, H, generator=gen), torch.randn(2, B, G, generator=gen)
    zs, ds = torch.randn(2, T * B, H, generator=gen), torch.randn(2, T * B, G, generator=gen)
    w2t, dst = w2.transpose(1, 2), ds.transpose(1, 2)
    layer_in = [x] + [torch.randn(T * B, H, generator=gen) for _ in range(L - 1)]
    if _device.type != "cpu" or dtype != torch.float32:
        x, w2, z, d, zs, ds = (t.to(_device, dtype) for t in (x, w2, z, d, zs, ds))
        w_ih = [w.to(_device, dtype) for w in w_ih]
        layer_in = [x] + [t.to(_device, dtype) for t in layer_in[1:]]

    def pairs_bmm():
        for t in range(T):
            torch.bmm(z, w2t)
        for t in range(T):
            torch.bmm(d, w2)
        torch.bmm(dst, zs)

    def pairs_mm():
        for t in range(T):
            z[0].mm(w2t[0]), z[1].mm(w2t[1])
        for t in range(T):
            d[0].mm(w2[0]), d[1].mm(w2[1])
        dst[0].mm(zs[0]), dst[1].mm(zs[1])

    pairs = min([pairs_bmm, pairs_mm], key=lambda f: min(_time(f) for _ in range(2)))

    def torch_mm():
        for l in range(L):
            layer_in[l].mm(w_ih[l].t())                  # input projection
            pairs()
            ds[0].mm(w_ih[l])                             # δx and δW_ih
            dst[0].mm(layer_in[l])

    fwd = products.Pair(w2, B)
    bwd = products.Pair(w2t, B)

    def rule():
        for l in range(L):
            products.mm_t(layer_in[l], w_ih[l])
            for t in range(T):
                fwd(z)
            for t in range(T):
                bwd(d)
            products.tmm(ds[0], zs[0]), products.tmm(ds[1], zs[1])
            products.mm_t(ds[0], w_ih[l].t())
            products.tmm(ds[0], layer_in[l])

    kind = products.kernel_name(x.device, x.dtype, step_weight=G * H)
    families = {"torch mm/bmm": torch_mm, f"flipout_lstm.nn.products ({kind})": rule}
    best = min(families, key=lambda n: min(_time(families[n]) for _ in range(2)))
    return families[best], best


_clock = time.perf_counter           # --clock cpu: time.process_time
_device = torch.device("cpu")        # --device
_precision = "fp32"                  # --precision (resolved for _device)


def _sync():
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)


def _run(fn):
    """``fn()`` under ``--precision``'s autocast, finished on the device when it returns."""
    with lm_precision.autocast(_precision, _device):
        fn()
    _sync()


def _time(fn):
    _sync()
    t0 = _clock()
    _run(fn)
    return _clock() - t0


def bench(shape_name, repeats, independent=True, bt_steps=25):
    shape = SHAPES[shape_name]
    B, T, I, H, L, index = shape
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L).to(_device)
    x = _inputs(shape, index)
    xd = _dense(x, I)
    ref_step = _fwd_bwd(ref, xd)
    steps = {}
    for name, (kw, target) in VARIANTS.items():
        m = LSTM(I, H, L, **kw).to(_device)
        m.load_state_dict(ref.state_dict())
        steps[name] = (_fwd_bwd(m, x), target)
    m_eval = LSTM(I, H, L).to(_device).eval()
    m_eval.load_state_dict(ref.state_dict())
    ref_eval = torch.nn.LSTM(I, H, L).to(_device).eval()
    ref_eval.load_state_dict(ref.state_dict())

    fns_ref = ref_step

    def eval_step(model, inp):
        def step():
            with torch.no_grad():
                model(inp)
        return step

    pairs = [(name, fns_ref, fn, target) for name, (fn, target) in steps.items()]
    floor, floor_kernels = _product_floor(shape, lm_precision.DTYPES.get(_precision,
                                                                         torch.float32))
    pairs.append(("flipout products only (GEMM floor)", fns_ref, floor, None))
    pairs.append(("eval forward (vs nn.LSTM eval fwd)", eval_step(ref_eval, xd),
                  eval_step(m_eval, x), 1.0))
    rows = []
    ref_times = []
    for name, ref_fn, fn, target in pairs:
        _run(ref_fn)
        used = _kernels_used(fn)                                    # warm-up
        if target is None:  # the GEMM floor: no recurrence, only products
            used = f"products only: {floor_kernels}"
        ts, ratios = [], []
        # Eval forward is short and compared against a 1.0x target: take more pairs.
        for r in range(repeats if target != 1.0 else max(9, 3 * repeats)):
            # Paired and alternating: the machine may be shared, so each ratio compares two
            # runs taken back to back, and the median ratio is reported.
            if r % 2:
                t = _time(fn)
                t_ref = _time(ref_fn)
            else:
                t_ref = _time(ref_fn)
                t = _time(fn)
            ts.append(t)
            ratios.append(t / t_ref)
            if ref_fn is fns_ref:
                ref_times.append(t_ref)
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios * 3)
        rows.append((name, statistics.median(ts), statistics.median(ratios), target, (q1, q3),
                     used))
    t_ref = statistics.median(ref_times)
    rows.insert(0, ("torch.nn.LSTM (fwd+bwd)", t_ref, 1.0, None, None, "oneDNN"))
    notes = []
    if shape_name == "char" and bt_steps and _device.type != "cpu":
        notes.append(f"bayesian-torch LSTMFlipout row skipped on {_device} (a CPU-only row here: "
                     f"its memory-capped child process runs on the CPU).")
    elif shape_name == "char" and bt_steps:
        t, why = _bayesian_torch_time(bt_steps, max(1, repeats // 2))
        if why:
            notes.append(why)
        else:
            t *= T / bt_steps
            rows.append((f"bayesian-torch LSTMFlipout ({bt_steps} steps, x{T / bt_steps:g})", t,
                         t / t_ref, None, None, "-"))
            notes.append(f"bayesian-torch LSTMFlipout resamples its weights at every step and "
                         f"keeps them all for backward (~24 GB at 100 steps), so it is timed over "
                         f"{bt_steps} steps in a memory-capped child process and scaled to {T}.")
    if independent and L >= 1:
        ind = _independent_step(ref, xd)
        if shape_name == "quick":
            _run(ind)
        t = _time(ind)
        rows.append(("independent per-example W (bmm, layer 1 only)", t, t / t_ref, None, None,
                     "-"))
        if L > 1:
            notes.append("independent per-example W runs the first layer only (a lower bound).")
        notes.append("independent per-example W is timed once, without warm-up.")
    return rows, notes


def _where() -> str:
    """The table header's device and precision: "1 thread, float32" for the CPU default."""
    prec = {"fp32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[_precision]
    if _device.type == "cpu":
        return f"{_threads()}, {prec}"
    return f"{_device} {torch.cuda.get_device_name(_device)}, {prec}"


def render(shape_name, rows, notes, repeats):
    B, T, I, H, L, index = SHAPES[shape_name]
    lines = [f"### {shape_name}: batch {B}, {T} steps, {'one-hot ' if index else ''}{I} -> {H}, "
             f"{L} layer{'s' if L > 1 else ''} (median of {repeats}, "
             f"{_where()}{', CPU time' if _clock is time.process_time else ''})", "",
             "| variant | ms | ratio vs nn.LSTM | ratio IQR | target | pass/fail | kernels |",
             "|---|---:|---:|---:|---:|---|---|"]
    for name, t, ratio, target, iqr, used in rows:
        tgt = "-" if target is None else f"<= {target:.1f}x"
        if target is None:
            verdict = "-"
        elif shape_name == "quick":
            verdict = "n/a (tiny shape: overhead only)"
        else:
            # The median misses but a quarter of the paired runs meet the target: the
            # difference is inside this machine's run-to-run noise, which is said, not hidden.
            verdict = ("pass" if ratio <= target else
                       "FAIL (within noise)" if iqr[0] <= target else "FAIL")
        spread = "-" if iqr is None else f"{iqr[0]:.2f}-{iqr[1]:.2f}"
        lines.append(f"| {name} | {t * 1e3:.1f} | {ratio:.2f}x | {spread} | {tgt} | {verdict} "
                     f"| {used} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["char", "word", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    ap.add_argument("--no-independent", action="store_true",
                    help="skip the (slow) independent per-example weights row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or this process's CPU time (a shared, busy core; "
                         "with one thread, since CPU time adds up all threads)")
    ap.add_argument("--bayesian-steps", type=int, default=25,
                    help="steps for the bayesian-torch row (0 skips it); scaled to the shape's")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda / cuda:N (models and inputs on the GPU)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="autocast every timed call (bf16: native bfloat16 only; fp16: CUDA)")
    ap.add_argument("--bayesian-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global _clock, _device, _precision
    try:
        _device = _parse_device(args.device)
        if _device.type == "cuda" and args.clock == "cpu":
            raise ConfigError("--clock cpu times this process's CPU, not the GPU; use --clock "
                              "wall (the default) with --device cuda")
        _precision = lm_precision.resolve(args.precision, _device, where="--precision")
    except ConfigError as e:
        print(f"lstm_speed.py: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    heap.keep_freed_memory()  # the heap as train.py runs the layer, for both sides alike
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.bayesian_child is not None:
        _bayesian_torch_child(args.bayesian_child, args.repeats)
        return
    shapes = ["quick"] if args.quick else (["char", "word"] if args.shape == "both" else [args.shape])
    repeats = 2 if args.quick else max(1, args.repeats)
    print(machine())
    print(f"Device: {_device}" + (f" ({torch.cuda.get_device_name(_device)}, CUDA "
                                  f"{torch.version.cuda})" if _device.type == "cuda" else "")
          + f"; precision: {_precision}")
    print()
    for s in shapes:
        rows, notes = bench(s, repeats, independent=not args.no_independent,
                            bt_steps=args.bayesian_steps)
        print(render(s, rows, notes, repeats))
        print()
        sys.stdout.flush()


def _parse_device(name: str) -> torch.device:
    """``--device`` as a torch.device, by the trainer's own rule (flipout_lstm.config.resolve_device)."""
    try:
        device = resolve_device(name)
    except ConfigError as exc:
        raise ConfigError(f"--device {name}: {exc}") from None
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


if __name__ == "__main__":
    sys.exit(main())
