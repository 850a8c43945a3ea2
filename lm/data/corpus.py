"""The three PTB splits as id streams, at word or character level.

Word level: tokens are ``line.split()`` of each line of ``ptb.<split>.txt`` plus one
``<eos>`` per line (train/valid/test = 929,589 / 73,760 / 82,430 tokens, vocabulary
10,000 including ``<eos>``). Character level: tokens are
:func:`lm.data.chars.word_line_to_chars` of each word line plus one ``<eos>`` per line
(5,017,482 / 393,042 / 442,423 tokens, vocabulary 50 = 49 characters + ``<eos>``);
the reference ``ptb.char.*.txt`` files are not read, the word files are the source.

The vocabulary is built from the training split (see :class:`lm.data.vocab.Vocab`)
unless one is passed in (resume / evaluation), in which case it is used unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.errors import ConfigError

from .chars import text_lines, word_line_chars
from .ptb import SPLITS, read_split_text, split_file
from .vocab import Vocab

LEVELS = ("word", "char")


@dataclass
class Corpus:
    """Token-id streams (1-D LongTensors, one ``<eos>`` per line) and their vocabulary."""

    level: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        """The stream of split ``name`` (``'train'``, ``'valid'`` or ``'test'``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def split_lines(text: str, level: str) -> list:
    """Token lines of one word file's text: lists of words, or strings of characters."""
    if level == "word":
        return [line.split() for line in text_lines(text)]
    return [word_line_chars(line) for line in text_lines(text)]


def load_corpus(level: str, root: str | os.PathLike, vocab: Vocab | None = None) -> Corpus:
    """Read ``ptb.{train,valid,test}.txt`` in ``root`` and encode them at ``level``.

    Missing, empty or non-UTF-8 files, and (without ``<unk>`` in the vocabulary)
    unknown tokens, raise :class:`lm.errors.DataError`.
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown corpus level {level!r}; use 'word' or 'char'")
    root = Path(root)
    lines = {s: split_lines(read_split_text(root, s), level) for s in SPLITS}
    if vocab is None:
        vocab = Vocab.build(lines["train"])
    streams = {s: vocab.encode(lines[s], source=str(root / split_file(s))) for s in SPLITS}
    return Corpus(level=level, vocab=vocab, **streams)


__all__ = ["LEVELS", "Corpus", "load_corpus", "split_lines"]
