"""The trainer's overhead per step: ``train.py``'s loop against a bare loop, same everything.

    python benchmarks/train_step.py [--recipes recipes/char_ptb.yaml recipes/word_ptb.yaml]
                                    [--precision fp32 [bf16 ...]] [--steps 12] [--warmup 3]
                                    [--threads N [N ...]] [--data-root DIR]

For each recipe (full size: its model, optimizer, batch and BPTT; any recipe ``train.py``
takes, the study scales such as ``recipes/ptb/word_wd_flipout.yaml`` or
``recipes/ptb/pilots/char_512_2m.yaml`` included) and each ``--precision`` (``train.precision``:
fp32, bf16 where the CPU computes bfloat16 natively), two loops over the same batches in one
process, on the CPU (``train.device=cpu``):

* **train.py**: ``train.main()`` itself with ``train.max_steps`` = warm-up + steps, run in
  process (no evaluation until the end, no checkpoints, no TensorBoard, no progress bar). A
  step is the time between two consecutive optimizer steps (a global
  ``torch.optim`` post-step hook), so it holds everything the loop does per step: batch,
  forward, loss, backward, clipping, the non-finite check, the optimizer, the schedule,
  logging.
* **bare**: the same model, optimizer and batches with nothing around them:
  ``forward; loss; zero_grad; backward; clip; step``, the forward and the loss under
  :func:`flipout_lstm.precision.autocast` as in ``train.py``.

The table gives the median step of each after the warm-up and the overhead
``train / bare - 1`` (target <= 5%), and the same from the fastest step of each, which on a
shared, loaded machine is the steadier estimate of what the loop itself costs, and each
loop's tokens per second (the median over the timed steps of the step's target tokens over
its time). With more than one precision or thread count (``--threads 1 2``: ``train.threads``,
and ``torch.set_num_threads`` for the bare loop, each in turn), a second table gives
``train.py``'s tokens/s per setting and each one's speed relative to the first (fp32 where it
is timed, and the first thread count; ``bf16/fp32`` > 1: bf16 is faster), all measured in this
one process. Two threads on one run against two runs on a core each is the choice a study on
a 2-core machine makes: a run that cannot finish in a session on one core may on two. The
corpus is the real training split (full vocabulary) with the first lines of the validation and
test splits, so the run's closing evaluation stays short; ``--data-root`` names the folder
with the PTB files (default ``$LM_DATA_ROOT``, else ``../shared/data/ptb``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train as train_script  # noqa: E402
from flipout_lstm import heap  # noqa: E402
from flipout_lstm import precision as lm_precision  # noqa: E402
from flipout_lstm.config import load_config  # noqa: E402
from flipout_lstm.errors import ConfigError  # noqa: E402
from flipout_lstm.data import TrainStream, open_corpus  # noqa: E402
from flipout_lstm.model import LanguageModel, cross_entropy_sum, detach_state  # noqa: E402
from flipout_lstm.optim import build_optimizer  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from lstm_speed import machine  # noqa: E402

SPLITS = ("train", "valid", "test")


def small_eval_corpus(src: Path, dst: Path, eval_lines: int = 20) -> Path:
    """``dst`` with the full training files of ``src`` (linked) and short valid/test files."""
    dst.mkdir(parents=True, exist_ok=True)
    for kind in ("ptb.", "ptb.char."):
        for split in SPLITS:
            f = src / f"{kind}{split}.txt"
            if not f.is_file():
                continue
            if split == "train":
                (dst / f.name).symlink_to(f.resolve())
            else:
                with open(f) as fh:
                    (dst / f.name).write_text("".join(fh.readline() for _ in range(eval_lines)))
    return dst


def overrides(root: Path, out_dir: Path, steps: int, threads: int | None,
              precision: str = "fp32") -> list[str]:
    o = {"data.root": root, "data.download": "false", "train.out_dir": out_dir,
         "train.run_name": "bench", "train.max_steps": steps, "train.eval_every": 0,
         "train.checkpoint_every": 0, "train.checkpoint_minutes": 0, "train.tensorboard": "false",
         "train.progress": "false", "train.device": "cpu", "train.precision": precision}
    if threads:
        o["train.threads"] = threads
    return [f"{k}={v}" for k, v in o.items()]


def time_trainer(recipe: str, ov: list[str]) -> list[float]:
    """Seconds of each step of ``train.main()`` (from one optimizer step to the next)."""
    stamps: list[float] = []
    handle = register_optimizer_step_post_hook(
        lambda *_: stamps.append(time.perf_counter()))
    try:
        rc = train_script.main([recipe, *ov])
    finally:
        handle.remove()
    if rc:
        raise SystemExit(f"train.py exited with {rc}")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def time_bare(recipe: str, ov: list[str], steps: int) -> tuple[list[float], list[int]]:
    """Seconds of each step of the bare loop over the trainer's model, optimizer, batches
    (forward and loss under ``train.precision``'s autocast, as in ``train.py``), and each
    batch's target tokens."""
    cfg = load_config(recipe, ov)
    device = torch.device("cpu")
    prec = lm_precision.resolve(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    corpus = open_corpus(cfg.data)
    dc = cfg.data
    train_data = corpus.train[:dc.train_tokens] if dc.train_tokens else corpus.train  # as train.py
    stream = TrainStream(train_data, dc.batch_size, dc.bptt, variable_bptt=dc.variable_bptt,
                         shuffle=dc.shuffle, seed=cfg.train.seed)
    model = LanguageModel(cfg.model, len(corpus.vocab))
    opt = build_optimizer(cfg.optim, model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
    model.train()
    times, tokens, state = [], [], None
    for i, batch in enumerate(stream.batches(0)):
        if i == steps:
            break
        tokens.append(batch.target.numel())
        t0 = time.perf_counter()
        state = detach_state(state) if dc.carry_state else None
        with lm_precision.autocast(prec, device):
            logits, state, _ = model(batch.input, state)
            loss = cross_entropy_sum(logits, batch.target) / batch.target.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times, tokens


def missing_recipes(prog: str, recipes: list[str]) -> bool:
    """Whether any of ``recipes`` is not a file, said on stderr as ``prog``'s one-line error."""
    missing = [r for r in recipes if not Path(r).is_file()]
    if missing:
        print(f"{prog}: error: no such recipe: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def tokens_per_s(times: list[float], tokens: list[int]) -> float:
    """The median over steps of each step's tokens over its seconds."""
    return statistics.median(n / t for n, t in zip(tokens, times))


def speed_table(speed: dict, recipes: list[str], precisions: list[str],
                threads: list[int]) -> str:
    """``train.py``'s tokens/s per setting (precision, thread count) and each setting's speed
    relative to the base: fp32 where it was timed, else the first precision, at the first
    thread count. A setting is named by what varies: ``bf16``, ``2 threads`` or both."""
    base_prec = "fp32" if "fp32" in precisions else precisions[0]
    base = (base_prec, threads[0])

    def name(prec, th):
        parts = ([prec] if len(precisions) > 1 else []) + \
            ([f"{th} thread{'s' * (th > 1)}"] if len(threads) > 1 else [])
        return " ".join(parts)

    settings = [(p, t) for p in precisions for t in threads]
    others = [s for s in settings if s != base]
    lines = ["| recipe | " + " | ".join(f"{name(*s)} tokens/s" for s in settings) + " | "
             + " | ".join(f"{name(*s)}/{name(*base)} speed" for s in others) + " |",
             "|---|" + "---:|" * (len(settings) + len(others))]
    for recipe in recipes:
        b = speed[(recipe, *base)]
        lines.append(f"| {recipe} | " + " | ".join(f"{speed[(recipe, *s)]:,.0f}" for s in settings)
                     + " | " + " | ".join(f"{speed[(recipe, *s)] / b:.2f}x" for s in others) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+",
                    default=["recipes/char_ptb.yaml", "recipes/word_ptb.yaml"])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="train.precision values to time, each in turn (bf16: native only)")
    ap.add_argument("--threads", type=int, nargs="+", default=[None],
                    help="CPU threads to time, each in turn (default: torch's)")
    ap.add_argument("--data-root", default=os.environ.get("LM_DATA_ROOT")
                    or str(REPO.parent / "shared" / "data" / "ptb"))
    args = ap.parse_args(argv)
    precisions = list(dict.fromkeys(args.precision))  # in order, once each
    if args.steps < 2:  # the trainer's step is timed between optimizer steps: one gives none
        print(f"train_step.py: error: --steps must be at least 2, got {args.steps}",
              file=sys.stderr)
        return 2
    if any(t is not None and t < 1 for t in args.threads):
        print("train_step.py: error: --threads takes positive numbers of threads, "
              f"got {' '.join(map(str, args.threads))}", file=sys.stderr)
        return 2
    try:
        for p in precisions:
            lm_precision.resolve(p, torch.device("cpu"), where="--precision")
    except ConfigError as e:
        print(f"train_step.py: error: {e}", file=sys.stderr)
        return 2
    if missing_recipes("train_step.py", args.recipes):
        return 2
    # Not given: torch's default, named and set like any other count.
    threads = list(dict.fromkeys(t or torch.get_num_threads() for t in args.threads))
    heap.keep_freed_memory()  # as train.py sets it, for the bare loop too
    n = args.warmup + args.steps
    print(machine())
    print(f"Device: cpu; precision: {' '.join(precisions)}; threads: "
          f"{' '.join(map(str, threads))}; {args.steps} timed steps "
          f"after {args.warmup} warm-up")
    print()
    print("| recipe | precision | threads | train.py step (ms) | bare step (ms) "
          "| overhead (median) | overhead (fastest) | target | train.py tokens/s "
          "| bare tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    settings = [(p, t) for p in precisions for t in threads]
    speed = {}  # (recipe, precision, threads): train.py tokens/s
    with tempfile.TemporaryDirectory() as tmp:
        root = small_eval_corpus(Path(args.data_root), Path(tmp) / "ptb")
        for recipe in args.recipes:
            for prec, th in settings:
                out = Path(tmp) / f"{Path(recipe).stem}-{prec}-{th}"
                ov = overrides(root, out, n, th, prec)
                torch.set_num_threads(th)  # as train.py does from train.threads
                trainer_all = time_trainer(recipe, ov)
                bare_all, tokens = time_bare(recipe, ov, n)
                # trainer_all[j] runs from optimizer step j + 1 to j + 2: batch j + 1's work.
                trainer, trainer_tok = trainer_all[args.warmup:], tokens[args.warmup + 1:]
                bare, bare_tok = bare_all[args.warmup:], tokens[args.warmup:]
                t, b = statistics.median(trainer), statistics.median(bare)
                over, over_min = t / b - 1, min(trainer) / min(bare) - 1
                speed[recipe, prec, th] = tokens_per_s(trainer, trainer_tok)
                print(f"| {recipe} | {prec} | {th} | {t * 1e3:.1f} "
                      f"| {b * 1e3:.1f} | {over * 100:+.1f}% | {over_min * 100:+.1f}% "
                      f"| <= 5% ({'pass' if over <= 0.05 else 'FAIL'}) "
                      f"| {speed[recipe, prec, th]:,.0f} | {tokens_per_s(bare, bare_tok):,.0f} |")
                sys.stdout.flush()
    if len(settings) > 1:
        print()
        print(speed_table(speed, args.recipes, precisions, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
