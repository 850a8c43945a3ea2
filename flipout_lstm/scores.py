"""What a language model's loss is reported as: the one rule for bits per character or perplexity.

A mean loss ``ℓ`` in nats per token is reported as bits per character, ``bpc = ℓ / ln 2``, when
a token is one character (``data.level: char``), and as perplexity, ``ppl = exp(ℓ)``, for words
and subword pieces. The trainer, ``evaluate.py``, the sweep and the report all ask here.
"""
from __future__ import annotations

import math


def metric(level: str) -> str:
    """``'bpc'`` for character-level tokens, ``'ppl'`` for words and subword pieces."""
    return "bpc" if level == "char" else "ppl"


def figures(loss: float, level: str) -> dict:
    """``{"bpc": ...}`` or ``{"ppl": ...}`` for a mean loss in nats."""
    if metric(level) == "bpc":
        return {"bpc": loss / math.log(2.0)}
    return {"ppl": math.exp(min(loss, 700.0))}  # past e^700 a float overflows


def fmt(value, name: str) -> str:
    """A score as tables and status lines show it: bpc to 3 decimals, ppl to 2."""
    if value is None:
        return "–"
    return f"{value:.3f}" if name == "bpc" else f"{value:.2f}"


def headline(loss: float, level: str) -> str:
    """``'bpc 1.234'`` or ``'ppl 123.45'``."""
    ((name, value),) = figures(loss, level).items()
    return f"{name} {fmt(value, name)}"
