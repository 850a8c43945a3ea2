"""What keeping freed memory in the heap (flipout_lstm.heap, as train.py does) saves of a
training step, on the CPU at hand.

    python benchmarks/freed_memory.py [--recipes recipes/ptb/word_wd.yaml ...] [--steps 8]
                                      [--warmup 2] [--repeats 2] [--threads N] [--data-root DIR]

Two arms in one process, over the same model, optimizer and batches (``train_step.py``'s bare
loop: forward, loss, backward, clip, step): glibc's heap settings, and freed memory kept
(:func:`flipout_lstm.heap.keep_freed_memory`). The arms alternate, in reverse order every
other repeat, so load from other processes falls on both alike. The table gives each arm's
median step, the speed-up (glibc / kept; > 1: keeping is faster) and the median of the
repeats' own ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from flipout_lstm import heap  # noqa: E402
from lstm_speed import machine  # noqa: E402
from train_step import missing_recipes, overrides, small_eval_corpus, time_bare  # noqa: E402

ARMS = ("glibc", "kept")
DEFAULT_RECIPES = ["recipes/ptb/word_wd.yaml", "recipes/ptb/char_mult_gauss_flipout.yaml",
                   "recipes/char_ptb.yaml", "recipes/word_ptb.yaml"]


def time_arm(recipe: str, ov: list[str], steps: int, warmup: int, arm: str) -> list[float]:
    """The timed steps of one arm: the heap set for it, then the bare loop; glibc's after."""
    heap.keep_freed_memory(arm == "kept")
    try:
        times, _ = time_bare(recipe, ov, warmup + steps)
    finally:
        heap.keep_freed_memory(False)
    return times[warmup:]


def alternate(arms: tuple[str, str], repeats: int, run) -> dict[str, list[list[float]]]:
    """Each arm's timed steps, a list per repeat: ``run(arm)`` for both arms in turn, in
    reverse order every other repeat, so that load from other processes falls on both alike."""
    steps: dict[str, list[list[float]]] = {a: [] for a in arms}
    for r in range(repeats):
        for a in (arms if r % 2 == 0 else arms[::-1]):
            steps[a].append(run(a))
    return steps


def compare(steps: dict[str, list[list[float]]], first: str, second: str):
    """Each arm's median step, the speed-up (first / second; > 1: the second is faster) and
    the median of the repeats' own ratios."""
    a, b = (statistics.median(t for rep in steps[arm] for t in rep) for arm in (first, second))
    per_repeat = statistics.median(statistics.median(x) / statistics.median(y)
                                   for x, y in zip(steps[first], steps[second]))
    return a, b, a / b, per_repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm and repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, each arm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=os.environ.get("LM_DATA_ROOT")
                    or str(REPO.parent / "shared" / "data" / "ptb"))
    args = ap.parse_args(argv)
    if not heap.available():
        print("freed_memory.py: error: this C library is not glibc, whose heap "
              "flipout_lstm.heap tunes; nothing to compare here", file=sys.stderr)
        return 2
    if missing_recipes("freed_memory.py", args.recipes):
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(f"Device: cpu, float32; {args.repeats} repeats x {args.steps} timed steps per arm, "
          f"after {args.warmup} warm-up")
    print()
    print("| recipe | glibc step (ms) | kept step (ms) | speed-up | speed-up per repeat (median) |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = small_eval_corpus(Path(args.data_root), Path(tmp) / "ptb")
        for recipe in args.recipes:
            ov = overrides(root, Path(tmp) / "out", args.warmup + args.steps, args.threads)
            steps = alternate(ARMS, args.repeats,
                              lambda a: time_arm(recipe, ov, args.steps, args.warmup, a))
            glibc, kept, speed_up, per_repeat = compare(steps, *ARMS)
            print(f"| {recipe} | {glibc * 1e3:.0f} | {kept * 1e3:.0f} | {speed_up:.2f}x "
                  f"| {per_repeat:.2f}x |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
