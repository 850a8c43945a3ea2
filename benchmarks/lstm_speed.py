"""Speed of ``lm.nn.LSTM``'s variants relative to ``torch.nn.LSTM``, in one process.

    python benchmarks/lstm_speed.py [--shape char|word|both] [--repeats N] [--quick]
                                    [--no-independent] [--threads N]

Prints one markdown table per shape: forward+backward time of each variant (eval: forward
only, against ``torch.nn.LSTM``'s eval forward), its ratio to ``torch.nn.LSTM`` measured in
the same rounds, the target ratio and pass/fail. Variants are timed round-robin (every
round times the reference and each variant once, after a warm-up round) and the median over
rounds is reported, so slow drifts of the machine hit all of them alike.

Shapes are the paper's: character (batch 32, 100 steps, one-hot 50 -> 1000, one layer) and
word (batch 40, 35 steps, 650 -> 650, two layers). ``--quick`` uses tiny shapes (smoke test).
Extra rows: bayesian-torch's ``LSTMFlipout`` (character shape, when installed) and fully
independent per-example weights (``torch.bmm`` per step under autograd, one weight matrix
per example), the cost that flipout avoids; the latter is timed once, it is slow.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lm.nn import LSTM  # noqa: E402

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
    "Gal": (dict(hidden_dropout=0.25), 1.4),
    "zoneout": (dict(zoneout_cell=0.5, zoneout_hidden=0.05), 1.4),
    "Semeniuta": (dict(cell_dropout=0.25), 1.4),
}


def _inputs(shape, index):
    B, T, I, H, L, _ = shape
    if index:
        return torch.randint(0, I, (T, B))
    return torch.randn(T, B, I)


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
        eps = torch.randn(B, *w_hh.shape)
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


def _bayesian_torch_step(shape, x):
    try:
        from bayesian_torch.layers import LSTMFlipout  # type: ignore
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    B, T, I, H, L, _ = shape
    model = LSTMFlipout(I, H)
    xb = x.transpose(0, 1).contiguous()                            # it is batch-first

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(xb)
        out = out[0] if isinstance(out, tuple) else out
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return step


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(shape_name, repeats, independent=True):
    shape = SHAPES[shape_name]
    B, T, I, H, L, index = shape
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L)
    x = _inputs(shape, index)
    xd = _dense(x, I)
    ref_step = _fwd_bwd(ref, xd)
    steps = {}
    for name, (kw, target) in VARIANTS.items():
        m = LSTM(I, H, L, **kw)
        m.load_state_dict(ref.state_dict())
        steps[name] = (_fwd_bwd(m, x), target)
    m_eval = LSTM(I, H, L).eval()
    m_eval.load_state_dict(ref.state_dict())
    ref_eval = torch.nn.LSTM(I, H, L).eval()
    ref_eval.load_state_dict(ref.state_dict())

    def eval_step(model, inp):
        def step():
            with torch.no_grad():
                model(inp)
        return step

    times = {name: [] for name in ["nn.LSTM", *steps, "eval forward", "nn.LSTM eval"]}
    fns = {"nn.LSTM": ref_step, **{k: v[0] for k, v in steps.items()},
           "eval forward": eval_step(m_eval, x), "nn.LSTM eval": eval_step(ref_eval, xd)}
    for fn in fns.values():                                          # warm-up round
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = [("torch.nn.LSTM (fwd+bwd)", med["nn.LSTM"], 1.0, None)]
    for name, (_, target) in steps.items():
        rows.append((name, med[name], med[name] / med["nn.LSTM"], target))
    rows.append(("eval forward (vs nn.LSTM eval fwd)", med["eval forward"],
                 med["eval forward"] / med["nn.LSTM eval"], 1.0))
    notes = []
    if shape_name == "char":
        bt = _bayesian_torch_step(shape, xd)
        if bt is None:
            notes.append("bayesian-torch is not installed: LSTMFlipout row skipped.")
        else:
            bt()
            t = statistics.median(_time(bt) for _ in range(max(1, repeats // 2)))
            rows.append(("bayesian-torch LSTMFlipout", t, t / med["nn.LSTM"], None))
    if independent and L >= 1:
        ind = _independent_step(ref, xd)
        if shape_name == "quick":
            ind()
        t = _time(ind)
        rows.append(("independent per-example W (bmm, layer 1 only)", t, t / med["nn.LSTM"], None))
        if L > 1:
            notes.append("independent per-example W runs the first layer only (a lower bound).")
        notes.append("independent per-example W is timed once, without warm-up.")
    return rows, notes


def render(shape_name, rows, notes, repeats):
    B, T, I, H, L, index = SHAPES[shape_name]
    lines = [f"### {shape_name}: batch {B}, {T} steps, {'one-hot ' if index else ''}{I} -> {H}, "
             f"{L} layer{'s' if L > 1 else ''} (median of {repeats}, "
             f"{torch.get_num_threads()} threads, float32)", "",
             "| variant | ms | ratio vs nn.LSTM | target | pass/fail |",
             "|---|---:|---:|---:|---|"]
    for name, t, ratio, target in rows:
        tgt = "-" if target is None else f"<= {target:.1f}x"
        verdict = "-" if target is None else ("pass" if ratio <= target else "FAIL")
        lines.append(f"| {name} | {t * 1e3:.1f} | {ratio:.2f}x | {tgt} | {verdict} |")
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ["quick"] if args.quick else (["char", "word"] if args.shape == "both" else [args.shape])
    repeats = 2 if args.quick else max(1, args.repeats)
    for s in shapes:
        rows, notes = bench(s, repeats, independent=not args.no_independent)
        print(render(s, rows, notes, repeats))
        print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
