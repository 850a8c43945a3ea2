"""Scoring a split: mean negative log-likelihood, bits per character, perplexity.

For N scored tokens with summed loss L (nats): mean loss ``ℓ = L / N``, bits per character
``bpc = ℓ / ln 2`` and perplexity ``ppl = exp(ℓ)``. The stream is scored with the hidden state
carried from chunk to chunk; with batch size 1 it is one unbroken stream (the exact figure),
a larger batch splits it into columns that each start from a zero state (faster, slightly
pessimistic).
"""
from __future__ import annotations

import math

import torch

from lm.data import eval_batches
from lm.model import cross_entropy_sum, detach_state


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, *, batch_size: int, bptt: int,
             bos_id: int, device: torch.device) -> dict:
    """Score every token of ``data``; returns ``{"loss": mean nats, "tokens": N}``."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for batch in eval_batches(data, batch_size, bptt, bos_id):
            logits, state, _ = model(batch.input.to(device), state)
            state = detach_state(state)
            mask = batch.mask.to(device)
            total += cross_entropy_sum(logits, batch.target.to(device), mask).item()
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return {"loss": total / count, "tokens": count}


def figures(loss: float, level: str) -> dict:
    """The headline figure for a mean loss in nats: bpc for characters, ppl for words."""
    if level == "char":
        return {"bpc": loss / math.log(2.0)}
    return {"ppl": math.exp(min(loss, 700.0))}


def headline(loss: float, level: str) -> str:
    name, value = next(iter(figures(loss, level).items()))
    return f"{name} {value:.3f}" if name == "bpc" else f"{name} {value:.2f}"
