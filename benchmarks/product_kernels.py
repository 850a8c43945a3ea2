"""Which kernel runs flipout's matrix products faster on this CPU: oneDNN or ``mm``/``bmm``.

    python benchmarks/product_kernels.py [--shape char|word|both|study-char|study-word|study]
                                         [--rounds N] [--quick]

The evidence behind :mod:`flipout_lstm.nn.products`' fixed rule (oneDNN for every float32
product where torch's CPU kernels are AVX-512; on AVX2, oneDNN for the recurrence's per-step
products against a weight of 2 MiB or more and MKL's ``mm`` for the rest). Each product of a
flipout call runs through the layer's own code (``products.Pair``, ``tmm``, ``mm_t``) with the
rule pinned to each kernel in turn, alternately in one process (the order flips every round, so load from
other processes mostly cancels); ``torch.nn.LSTM``'s forward and backward is timed in the
same rounds. Prints the CPU line, then per shape a table of median milliseconds, the ratio
oneDNN / ``mm``, and the products' total as a ratio to ``torch.nn.LSTM`` under each kernel
(the flipout floor ``benchmarks/lstm_speed.py`` reports, per kernel), and the products'
total under the rule here, each from its kernel's column. Float32, one layer's products (the
word shape's two layers cost twice).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flipout_lstm.nn import products  # noqa: E402
from lstm_speed import machine  # noqa: E402  (this script's folder is on sys.path)

SHAPES = {  # batch, steps, input, hidden
    "char": (32, 100, 50, 1000),
    "word": (40, 35, 650, 650),
    # The PTB study's sizes (recipes/ptb/scale/): the per-step weight of 4 MiB and 625 KiB on
    # either side of the rule's STEP_WEIGHT_BYTES.
    "study-char": (32, 100, 50, 512),
    "study-word": (40, 35, 200, 200),
    "quick": (8, 10, 64, 128),
}


@contextlib.contextmanager
def pinned(onednn: bool):
    """The layer's products with the rule pinned: oneDNN for every CPU float32/bfloat16
    product (where it runs), per-step or not, or ``mm`` for all of them."""
    rule = products.uses_onednn
    products.uses_onednn = lambda device, dtype, step_weight=0: (
        onednn and products.onednn_runs(device, dtype))
    try:
        yield
    finally:
        products.uses_onednn = rule


def product_steps(B, T, I, H):
    """name -> a function running that product of one flipout layer call (its steps over T)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w2, w_ih, x = r(2, 4 * H, H), r(4 * H, I), r(T * B, I)
    z, d, zs, ds = r(2, B, H), r(2, B, 4 * H), r(2, T * B, H), r(2, T * B, 4 * H)

    def forward_pairs():
        pair = products.Pair(w2, B)
        for _ in range(T):
            pair(z)

    def backward_pairs():
        pair = products.Pair(w2.transpose(1, 2), B)
        for _ in range(T):
            pair(d)

    steps = {"per-step forward pair": forward_pairs,
             "per-step backward pair": backward_pairs,
             "weight gradients of the pair": lambda: products.tmm_pair(ds, zs)}
    if I > 50:  # a one-hot input (the char model) is a lookup, not a product
        steps.update({"input projection": lambda: products.mm_t(x, w_ih),
                      "its input gradient": lambda: products.mm_t(ds[0], w_ih.t()),
                      "its weight gradient": lambda: products.tmm(ds[0], x)})
    return steps


def measure(shape: str, rounds: int):
    """(rows of (name, oneDNN ms, mm ms), torch.nn.LSTM ms), medians over ``rounds``."""
    B, T, I, H = SHAPES[shape]
    lstm, xin = torch.nn.LSTM(I, H), torch.randn(T, B, I)

    def reference():
        y, _ = lstm(xin)
        y.sum().backward()
    runs = [("torch.nn.LSTM", None, reference)]
    for name, fn in product_steps(B, T, I, H).items():
        runs += [(name, True, fn), (name, False, fn)]
    times = {(name, k): [] for name, k, _ in runs}
    for r in range(rounds + 1):                      # round 0 warms up
        for name, k, fn in (runs if r % 2 == 0 else runs[::-1]):
            with pinned(bool(k)):
                t = time.perf_counter()
                fn()
                if r:
                    times[name, k].append((time.perf_counter() - t) * 1e3)
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = [(name, med[name, True], med[name, False]) for name, k, _ in runs if k]
    return rows, med["torch.nn.LSTM", None]


def table(shape: str, rows, ref_ms: float) -> str:
    B, T, I, H = SHAPES[shape]
    lines = [f"### {shape}: batch {B}, {T} steps, {I} -> {H}, one layer's products "
             f"(median ms; torch.nn.LSTM fwd+bwd {ref_ms:.1f} ms)", "",
             "| product | oneDNN | mm/bmm | oneDNN / mm |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    one, mm = sum(a for _, a, _ in rows), sum(b for _, _, b in rows)
    lines.append(f"| **all, vs torch.nn.LSTM** | **{one / ref_ms:.2f}x** | **{mm / ref_ms:.2f}x** "
                 f"| {one / mm:.2f} |")
    # The rule's own total: each product from the column of the kernel the rule gives it.
    cpu, f32 = torch.device("cpu"), torch.float32
    picks = [products.uses_onednn(cpu, f32, 4 * H * H if name.startswith("per-step") else 0)
             for name, _, _ in rows]
    ours = sum(a if k else b for (_, a, b), k in zip(rows, picks))
    kinds = ", ".join(f"{name} {'oneDNN' if k else 'mm'}" for name, k in (
        ("per-step", picks[0]), ("the rest", picks[-1])))
    lines += ["", f"The rule here ({kinds}): {ours / ref_ms:.2f}x torch.nn.LSTM"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["char", "word", "both", "study-char", "study-word",
                                        "study"], default="both",
                    help="both: char and word (the paper's); study: the PTB study's two")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if not products.onednn_available(torch.float32):
        print("error: oneDNN's matmul does not run in this torch build; the rule is mm "
              "everywhere and there is nothing to compare", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"The rule here (torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}): "
          f"float32 products through oneDNN where it is AVX-512; elsewhere the per-step "
          f"products against a weight of {products.STEP_WEIGHT_BYTES / 2 ** 20:g} MiB or more too, "
          f"the rest through mm\n")
    pairs = {"both": ["char", "word"], "study": ["study-char", "study-word"]}
    shapes = ["quick"] if args.quick else pairs.get(args.shape, [args.shape])
    for shape in shapes:
        print(table(shape, *measure(shape, args.rounds)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
