"""Score a checkpoint on a split: tokens scored, mean loss, bits per character or perplexity.

    python evaluate.py checkpoints/<run>/best.pt [--split valid|test] [--batch-size N] [--json]
                       [--warmup W] [--reset-every N] [--threads N] [--no-progress]
                       [--mc-samples K [--seed S]]

The model, its config and its tokenizer (vocabulary, or sentencepiece model) all come from
the checkpoint, so the ids are the training run's; the corpus is the run's ``data.source``.
Besides the per-token figure, ``bpc_raw`` is bits per character of the split's raw text, one
scale for every tokenizer (:func:`flipout_lstm.evaluation.raw_bpc`). ``--batch-size 1`` scores the
split as one unbroken stream with the state carried (the exact figure); the default, the
recipe's ``data.eval_batch_size`` columns each warmed up on the ``data.eval_warmup`` tokens
before their start (``--warmup``), comes to the same figure much faster (flipout_lstm.data.EvalStream).
``--reset-every N`` zeroes the state every N tokens instead: with N the training window it
scores a character run in the condition it was trained in. Ctrl-C stops with exit status 130.
``--mc-samples K`` adds the Monte Carlo figure beside the deterministic one: the model's noise
(dropout, weight noise, zoneout) on, each token's probability averaged over K draws
(:func:`flipout_lstm.evaluation.evaluate_mc`); ``--seed`` fixes the draws.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from flipout_lstm import heap, precision, scores
from flipout_lstm.config import resolve_device
from flipout_lstm.data import open_corpus
from flipout_lstm.data.ptb import for_command
from flipout_lstm.errors import DataError, UserError, exit_status
from flipout_lstm.evaluation import eval_warmup, evaluate, evaluate_mc, raw_bpc
from flipout_lstm.scores import figures
from flipout_lstm.trained import load_trained


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a best.pt, last.pt or ckpt-*.pt written by train.py")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=None,
                   help="columns scored in parallel; 1 is exact (default: the recipe's eval batch)")
    p.add_argument("--bptt", type=int, default=None, help="steps per chunk (default: the recipe's)")
    p.add_argument("--data-root", default=None,
                   help="folder with ptb.*.txt (default: the recipe's data.root, $LM_DATA_ROOT, data/ptb)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else the CPU, as in training), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default=None,
                   help="autocast while scoring (default: the precision the run trained in)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--warmup", type=int, default=None, metavar="W",
                   help="tokens each column reads unscored before its start (default: the recipe's "
                        "data.eval_warmup, else the level's default; 0: none)")
    p.add_argument("--reset-every", type=int, default=None, metavar="N",
                   help="zero the state every N tokens (N = the training window: the training "
                        "condition of character runs); default: never")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mc-samples", type=int, default=None, metavar="K",
                   help="also score the predictive distribution averaged over K noise samples "
                        "(noise on, per-token probabilities averaged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --mc-samples noise (default 0)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        return exit_status(exc)
    except KeyboardInterrupt:
        print(f"\ninterrupted: scoring {args.checkpoint} on the {args.split} split stopped; "
              f"nothing was written", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        name = scores.metric(result["level"])
        print(f"{result['checkpoint']}: {result['split']} split, {result['tokens']:,} tokens, "
              f"loss {result['loss']:.4f} nats, {name} {result[name]:.4f}"
              + (f", bpc_raw {result['bpc_raw']:.4f}" if "bpc_raw" in result else "")
              + (f"; Monte Carlo over {result['mc_samples']} noise samples: loss "
                 f"{result['mc_loss']:.4f} nats, {name} {result['mc_' + name]:.4f}"
                 + (f", bpc_raw {result['mc_bpc_raw']:.4f}" if "mc_bpc_raw" in result else "")
                 if "mc_samples" in result else ""))
    return 0


def open_split(data_cfg, ckpt: dict, args):
    """The checkpoint's corpus with the split to score; ``--data-root`` overrides the recipe's
    ``data.root``, and a missing corpus is advised in this command's terms (``--data-root``,
    not the recipe key it cannot take)."""
    if args.data_root:
        data_cfg.root = args.data_root
    try:
        return open_corpus(data_cfg, saved=ckpt, source=args.checkpoint, splits=(args.split,))
    except DataError as exc:
        raise for_command(exc, "--data-root") from None


def run(args) -> dict:
    for flag in ("batch_size", "bptt", "reset_every", "threads", "mc_samples"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0 tokens (0: no warm-up), got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    heap.keep_freed_memory()  # each batch's big CPU blocks reused, not faulted in anew (heap.py)
    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, device)
    model, cfg, ckpt, vocab = trained.model, trained.config, trained.ckpt, trained.tokenizer.vocab
    corpus = open_split(cfg.data, ckpt, args)
    batch_size = args.batch_size or cfg.data.eval_batch_size
    warmup = eval_warmup(cfg.data) if args.warmup is None else args.warmup
    scoring = dict(batch_size=batch_size, bptt=args.bptt or cfg.data.eval_bptt or cfg.data.bptt,
                   bos_id=vocab.eos_id, device=device, warmup=warmup,
                   reset_every=args.reset_every or 0, progress=not args.no_progress)
    # The run's own precision unless --precision overrides it (refused where it cannot run).
    where = "--precision" if args.precision else "the run's train.precision (override with --precision)"
    amp = precision.resolve(args.precision or cfg.train.precision, device, where=where)
    with precision.autocast(amp, device):
        result = evaluate(model, corpus.split(args.split), **scoring)
    out = {"checkpoint": args.checkpoint, "split": args.split, "level": corpus.level,
           "precision": amp,
           "batch_size": batch_size, "warmup": 0 if args.reset_every else warmup,
           "reset_every": args.reset_every or 0,
           "tokens": result["tokens"], "loss": result["loss"], **figures(result["loss"], corpus.level),
           **raw_bpc(result["loss"], result["tokens"], corpus.chars.get(args.split))}
    if args.mc_samples:
        torch.manual_seed(args.seed)  # the noise draws: the same figure on every call
        with precision.autocast(amp, device):
            mc = evaluate_mc(model, corpus.split(args.split), samples=args.mc_samples, **scoring)
        mc_figures = {**figures(mc["loss"], corpus.level),
                      **raw_bpc(mc["loss"], mc["tokens"], corpus.chars.get(args.split))}
        out.update({"mc_samples": args.mc_samples, "mc_seed": args.seed, "mc_loss": mc["loss"],
                    **{f"mc_{k}": v for k, v in mc_figures.items()}})
    return out


if __name__ == "__main__":
    sys.exit(main())
