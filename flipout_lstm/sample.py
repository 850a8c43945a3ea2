"""Generate text from a trained checkpoint, decoded by the run's own tokenizer.

    python -m flipout_lstm.sample CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]

The model reads ``<eos>`` (the start of a line, as in evaluation) and the prompt's tokens,
then draws ``N`` tokens one at a time from ``softmax(logits / T)``, restricted to the ``K``
most likely tokens when ``--top-k`` is given (``--top-k 1`` is greedy decoding). The model
is in evaluation mode (no dropout, no weight noise; the NT-ASGD average where the checkpoint
has one). The printed text is the prompt followed by the continuation: ``<eos>`` becomes a
newline, PTB's character level shows ``_`` as a space, sentencepiece pieces are detokenized.
The draws come from a generator seeded with ``--seed``, so a seed gives the same text.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from flipout_lstm.config import resolve_device
from flipout_lstm.errors import DataError, UserError, exit_status
from flipout_lstm.trained import load_trained


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flipout_lstm.sample", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a best.pt, last.pt or ckpt-*.pt written by train.py")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new line)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits; < 1 is more conservative (default 1.0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the K most likely tokens only; 0: all (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws (default 0)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else the CPU, as in training), cpu, cuda or "
                        "cuda:N (default auto)")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.tokens <= 0:
        raise UserError(f"--tokens must be a positive number of tokens, got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {args.temperature}; "
                        f"use --top-k 1 for greedy decoding")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: all tokens), got {args.top_k}")


@torch.no_grad()
def generate(model: torch.nn.Module, context: list[int], tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Draw ``tokens`` ids after ``context`` (a non-empty list of ids), carrying the state."""
    model.eval()
    device = next(model.parameters()).device
    logits, state, _ = model(torch.tensor(context, dtype=torch.long, device=device).view(-1, 1), None)
    out: list[int] = []
    for _ in range(tokens):
        scores = logits[-1, 0].float().cpu() / temperature
        if 0 < top_k < scores.numel():
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        nxt = int(torch.multinomial(torch.softmax(scores, dim=0), 1, generator=generator))
        out.append(nxt)
        logits, state, _ = model(torch.tensor([[nxt]], device=device), state)
    return out


def run(args) -> str:
    check_args(args)
    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, device)
    model, tokenizer = trained.model, trained.tokenizer
    try:
        prompt = tokenizer.encode_prompt(args.prompt) if args.prompt else []
    except DataError as exc:
        raise UserError(f"--prompt: {exc}") from None
    generator = torch.Generator().manual_seed(args.seed)
    ids = generate(model, [tokenizer.eos_id] + prompt, args.tokens, temperature=args.temperature,
                   top_k=args.top_k, generator=generator)
    return tokenizer.decode(prompt + ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        text = run(args)
    except UserError as exc:
        return exit_status(exc)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
