"""What computing the loss by row blocks (flipout_lstm.model.cross_entropy_sum above
``BLOCKED_LOSS_ABOVE`` logits) saves of a training step, on the CPU at hand.

    python benchmarks/blocked_loss.py [--recipes recipes/ptb/large_batch_wd_flipout.yaml ...]
                                      [--precision bf16] [--heap kept glibc] [--steps 3]
                                      [--warmup 1] [--repeats 2] [--threads N] [--data-root DIR]
                                      [--set data.batch_size=160 ...]

Two arms in one process, over the same model, optimizer and batches (``train_step.py``'s bare
loop: forward, loss, backward, clip, step): torch's ``cross_entropy`` on the logits in float32,
and the row blocks, each forced whatever the logits' size. The arms alternate, in reverse
order every other repeat, so load from other processes falls on both alike. ``--heap`` runs
the pair under each heap setting in turn (``kept``: freed memory kept, as ``train.py`` does;
``glibc``: its defaults, as ``LM_KEEP_FREED_MEMORY=0`` leaves them). The table gives the logits
of a step (rows x vocabulary, the median over the timed steps), which arm the rule takes for
them, each arm's median step, the speed-up (torch / blocks; > 1: blocks are faster) and the
median of the repeats' own ratios. ``--set`` applies ``key=value`` overrides to every recipe
(a batch size between the two recipes' finds where the rule's threshold should lie).
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
from flipout_lstm import model as lm_model  # noqa: E402
from flipout_lstm import precision as lm_precision  # noqa: E402
from flipout_lstm.config import load_config  # noqa: E402
from flipout_lstm.data import open_corpus  # noqa: E402
from flipout_lstm.errors import ConfigError  # noqa: E402
from lstm_speed import machine  # noqa: E402
from freed_memory import alternate, compare  # noqa: E402
from train_step import missing_recipes, overrides, small_eval_corpus, time_bare  # noqa: E402

ARMS = ("torch", "blocks")
DEFAULT_RECIPES = ["recipes/ptb/large_batch_wd_flipout.yaml", "recipes/ptb/word_wd.yaml"]


def time_arm(recipe: str, ov: list[str], steps: int, warmup: int, arm: str):
    """The timed steps of one arm and their tokens: the loss's rule forced to ``arm``, then
    the bare loop; the rule restored after."""
    rule = lm_model.BLOCKED_LOSS_ABOVE
    lm_model.BLOCKED_LOSS_ABOVE = -1 if arm == "blocks" else float("inf")
    try:
        times, tokens = time_bare(recipe, ov, warmup + steps)
    finally:
        lm_model.BLOCKED_LOSS_ABOVE = rule
    return times[warmup:], tokens[warmup:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                    help="train.precision for every recipe (bf16: native only)")
    ap.add_argument("--heap", nargs="+", default=["kept"], choices=["kept", "glibc"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm and repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first, each arm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every recipe, as train.py takes them")
    ap.add_argument("--data-root", default=os.environ.get("LM_DATA_ROOT")
                    or str(REPO.parent / "shared" / "data" / "ptb"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        print("blocked_loss.py: error: --steps and --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        lm_precision.resolve(args.precision, torch.device("cpu"), where="--precision")
    except ConfigError as e:
        print(f"blocked_loss.py: error: {e}", file=sys.stderr)
        return 2
    if missing_recipes("blocked_loss.py", args.recipes):
        return 2
    try:
        for recipe in args.recipes:
            load_config(recipe, args.set)
    except ConfigError as e:
        print(f"blocked_loss.py: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(f"Device: cpu, {args.precision}; {args.repeats} repeats x {args.steps} timed steps per "
          f"arm, after {args.warmup} warm-up; the rule takes blocks above "
          f"{lm_model.BLOCKED_LOSS_ABOVE:,} logits")
    print()
    print("| recipe | heap | logits a step | rule takes | torch step (ms) | blocks step (ms) "
          "| speed-up | speed-up per repeat (median) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = small_eval_corpus(Path(args.data_root), Path(tmp) / "ptb")
        for recipe in args.recipes:
            ov = overrides(root, Path(tmp) / "out", args.warmup + args.steps, args.threads,
                           args.precision) + args.set
            vocab = len(open_corpus(load_config(recipe, ov).data).vocab)
            for asked in dict.fromkeys(args.heap):
                # What it got: LM_KEEP_FREED_MEMORY=0, or a C library other than glibc, keeps none.
                setting = "kept" if heap.keep_freed_memory(asked == "kept") else "glibc"
                tokens: list[int] = []

                def run(arm):
                    times, tok = time_arm(recipe, ov, args.steps, args.warmup, arm)
                    tokens.extend(tok)
                    return times
                try:
                    steps = alternate(ARMS, args.repeats, run)
                finally:
                    heap.keep_freed_memory(False)
                logits = statistics.median(tokens) * vocab
                takes = "blocks" if logits > lm_model.BLOCKED_LOSS_ABOVE else "torch"
                plain, blocks, speed_up, per_repeat = compare(steps, *ARMS)
                name = " ".join([recipe, *args.set])
                print(f"| {name} | {setting} | {logits:,.0f} | {takes} | {plain * 1e3:.0f} "
                      f"| {blocks * 1e3:.0f} | {speed_up:.2f}x | {per_repeat:.2f}x |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
