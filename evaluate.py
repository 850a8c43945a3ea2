"""Score a checkpoint on a PTB split: tokens scored, mean loss, bits per character or perplexity.

    python evaluate.py checkpoints/<run>/best.pt [--split valid|test] [--batch-size N] [--json]

The model, its config and its vocabulary all come from the checkpoint, so the ids are the
training run's. ``--batch-size 1`` scores the split as one unbroken stream with the state
carried (the exact figure); the default, the recipe's ``data.eval_batch_size``, is faster.
"""
from __future__ import annotations

import argparse
import json
import sys

from lm import checkpoint
from lm.config import config_from_dict, resolve_device
from lm.data import Vocab, load_corpus, prepare_ptb
from lm.errors import UserError
from lm.evaluation import evaluate, figures
from lm.model import LanguageModel


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a best.pt, last.pt or ckpt-*.pt written by train.py")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=None,
                   help="columns scored in parallel; 1 is exact (default: the recipe's eval batch)")
    p.add_argument("--bptt", type=int, default=None, help="steps per chunk (default: the recipe's)")
    p.add_argument("--data-root", default=None,
                   help="folder with ptb.*.txt (default: the recipe's data.root, $LM_DATA_ROOT, data/ptb)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        name = "bpc" if "bpc" in result else "ppl"
        print(f"{result['checkpoint']}: {result['split']} split, {result['tokens']:,} tokens, "
              f"loss {result['loss']:.4f} nats, {name} {result[name]:.4f}")
    return 0


def run(args) -> dict:
    for flag in ("batch_size", "bptt"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    device = resolve_device(args.device)
    ckpt = checkpoint.load(args.checkpoint, map_location=device)
    cfg = config_from_dict(ckpt["config"])
    vocab = Vocab.from_dict(ckpt["vocab"], source=args.checkpoint)
    model = LanguageModel(cfg.model, len(vocab))
    checkpoint.load_model_state(model, checkpoint.eval_weights(ckpt), args.checkpoint)
    model.to(device)
    root = prepare_ptb(args.data_root or cfg.data.root, cfg.data.url, download=cfg.data.download)
    corpus = load_corpus(cfg.data.level, root, vocab=vocab)
    result = evaluate(model, corpus.split(args.split),
                      batch_size=args.batch_size or cfg.data.eval_batch_size,
                      bptt=args.bptt or cfg.data.eval_bptt or cfg.data.bptt,
                      bos_id=vocab.eos_id, device=device)
    return {"checkpoint": args.checkpoint, "split": args.split, "level": cfg.data.level,
            "tokens": result["tokens"], "loss": result["loss"], **figures(result["loss"], cfg.data.level)}


if __name__ == "__main__":
    sys.exit(main())
