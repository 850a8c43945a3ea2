"""The three PTB splits as id streams, at word or character level.

Word level: tokens are ``line.split()`` of each line of ``ptb.<split>.txt`` plus one
``<eos>`` per line (train/valid/test = 929,589 / 73,760 / 82,430 tokens, vocabulary
10,000 including ``<eos>``). Character level: tokens are
:func:`flipout_lstm.data.chars.word_line_to_chars` of each word line plus one ``<eos>`` per line
(5,017,482 / 393,042 / 442,423 tokens, vocabulary 50 = 49 characters + ``<eos>``);
the reference ``ptb.char.*.txt`` files are not read, the word files are the source.

The vocabulary is built from the training split (see :class:`flipout_lstm.data.vocab.Vocab`)
unless one is passed in (resume / evaluation), in which case it is used unchanged.

:func:`open_corpus` is the one way in, for the trainer, ``evaluate.py``, the samplers and the
tests: it reads any
source (:mod:`flipout_lstm.data.sources`) with any tokenizer (:mod:`flipout_lstm.data.tokenizers`). PTB at the
char or word level with Mikolov's vocabulary (no ``data.min_count``) goes through
the PTB reader above (one second, in memory); every other corpus or tokenizer is
trained, encoded and cached on disk
(:mod:`flipout_lstm.data.cache`). Either way the corpus knows each split's raw character count, the
denominator of ``bpc_raw`` (:func:`flipout_lstm.evaluation.raw_bpc`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flipout_lstm.errors import ConfigError

from .cache import Cache, cache_root
from .chars import text_lines, word_line_chars
from .ptb import SPLITS, prepare_ptb, read_split_text, split_file
from .sources import open_splits
from .tokenizers import (Tokenizer, build_vocab, make_tokenizer, tokenizer_from_checkpoint,
                         tokenizer_kind, train_sentencepiece)
from .vocab import Vocab

LEVELS = ("word", "char")


@dataclass
class Corpus:
    """Token-id streams (1-D LongTensors, one ``<eos>`` per line) and their vocabulary.

    ``level`` is ``'char'`` when a token is a character (figures in bpc) and otherwise
    ``'word'`` or ``'sentencepiece'`` (perplexity). :func:`open_corpus` also fills in the
    ``tokenizer``, ``chars`` (raw characters per split) and a ``description``; a split it
    was not asked for is None.
    """

    level: str
    vocab: Vocab
    train: torch.Tensor | None
    valid: torch.Tensor | None
    test: torch.Tensor | None
    tokenizer: Tokenizer | None = None
    chars: dict = field(default_factory=dict)
    description: str = ""

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


def _read_ptb(level: str, root: str | os.PathLike, vocab: Vocab | None = None) -> Corpus:
    """Read ``ptb.{train,valid,test}.txt`` in ``root`` and encode them at ``level``.

    Missing, empty or non-UTF-8 files, and (without ``<unk>`` in the vocabulary)
    unknown tokens, raise :class:`flipout_lstm.errors.DataError`.
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown corpus level {level!r}; use 'word' or 'char'")
    root = Path(root)
    lines = {s: split_lines(read_split_text(root, s), level) for s in SPLITS}
    if vocab is None:
        vocab = Vocab.build(lines["train"])
    streams = {s: vocab.encode(lines[s], source=str(root / split_file(s))) for s in SPLITS}
    return Corpus(level=level, vocab=vocab, **streams)


def _ptb_chars(root: Path, split: str) -> int:
    """Raw characters of a PTB file: each line's characters plus one for its end."""
    lines = text_lines(read_split_text(root, split))
    return sum(map(len, lines)) + len(lines)


def _describe_source(dc) -> str:
    if dc.source == "ptb":
        return "PTB"
    if dc.source == "text":
        return f"text files ({dc.train}, ...)"
    return f"dataset {dc.path or dc.name}" + (f" ({dc.config})" if dc.config and not dc.path else "")


def _build_tokenizer(dc, kind: str):
    """A function that trains ``kind`` on the training split's text."""
    def build(train_text):
        if kind == "sentencepiece":
            return make_tokenizer(kind, model=train_sentencepiece(train_text.lines(), dc.vocab_size,
                                                                  dc.sp_model or "unigram"))
        return make_tokenizer(kind, build_vocab(kind, train_text.lines(), dc.min_count or 1))
    return build


def open_corpus(dc, *, saved: dict | None = None, source: str = "the checkpoint",
                splits: tuple = SPLITS) -> Corpus:
    """The corpus that data config ``dc`` describes, with the splits named in ``splits``.

    Without ``saved`` the tokenizer is built from the training split (or read from the
    cache); with ``saved`` (a checkpoint dict; ``source`` names it in errors) it is the
    checkpoint's, so resumed and evaluated runs use the training run's ids.
    """
    kind = tokenizer_kind(dc)
    if dc.source == "ptb" and dc.level != "subword" and dc.min_count is None:  # PTB as published
        root = prepare_ptb(dc.root, dc.url, download=dc.download)
        vocab = tokenizer_from_checkpoint(saved, dc, source).vocab if saved is not None else None
        corpus = _read_ptb(dc.level, root, vocab=vocab)
        for s in SPLITS:
            if s not in splits:
                setattr(corpus, s, None)
        corpus.tokenizer = make_tokenizer(kind, corpus.vocab)
        corpus.chars = {s: _ptb_chars(root, s) for s in splits}
        corpus.description = f"{dc.level}-level PTB"
        return corpus
    needed = tuple(s for s in SPLITS if s in splits or (s == "train" and saved is None))
    texts = open_splits(dc, needed)
    cache = Cache(cache_root(dc.cache_dir))
    if saved is not None:
        tokenizer = tokenizer_from_checkpoint(saved, dc, source)
    else:
        settings = {"kind": kind, "min_count": dc.min_count, "vocab_size": dc.vocab_size,
                    "sp_model": dc.sp_model}
        tokenizer = cache.tokenizer(settings, texts["train"], _build_tokenizer(dc, kind))
    streams, chars = {s: None for s in SPLITS}, {}
    for s in splits:
        ids, info = cache.encoded(tokenizer, texts[s])
        streams[s] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        chars[s] = info["chars"]
    what = f"{kind} ({len(tokenizer):,} pieces)" if kind == "sentencepiece" else kind
    return Corpus(level=tokenizer.metric_level, vocab=tokenizer.vocab, tokenizer=tokenizer, chars=chars,
                  description=f"{what} tokens of {_describe_source(dc)}", **streams)


__all__ = ["LEVELS", "Corpus", "open_corpus", "split_lines"]
