"""Tokenizers: text lines <-> id streams, each line's ids followed by ``<eos>`` (id 0).

Kinds (``data.level`` and the source decide, see :func:`tokenizer_kind`):

* ``word`` -- ``line.split()``. The vocabulary is built from the training split: ``<eos>``,
  then every token seen at least ``data.min_count`` times in order of first occurrence, then
  ``<unk>`` if it is not already there; every other token encodes as ``<unk>``. On PTB with
  ``min_count=1`` this is exactly :meth:`Vocab.build` (PTB's text already holds ``<unk>``).
* ``char`` -- the characters of the line as they are (spaces included), plus ``<unk>`` for
  characters the training split lacks.
* ``ptb_char`` -- PTB's character level (``data.source=ptb``, ``data.level=char``): the words
  of the line joined by ``_`` (:mod:`flipout_lstm.data.chars`), no ``<unk>``.
* ``sentencepiece`` -- (``data.level=subword``) a ``bpe`` or ``unigram`` model of ``data.vocab_size`` pieces trained with
  the ``sentencepiece`` library on the training split. Text is not normalized and whitespace
  is kept (``▁``), so decoding gives back the line exactly; id 0 is ``<eos>``, id 1 the unknown
  piece (characters never seen in training). Training reads the split as a stream and keeps a
  seeded sample of at most :data:`SP_SAMPLE_SENTENCES` non-empty lines; with the seed and the
  thread count fixed, the same text and settings give the same model on any machine.

A tokenizer is rebuilt from ``(kind, vocabulary, model bytes)``, which every checkpoint
carries (:meth:`Tokenizer.state`), so evaluation, sampling and ``--resume`` use the training
run's own ids. :attr:`Tokenizer.fingerprint` names it for the encoding cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from array import array
from collections import Counter
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable

import numpy as np

from flipout_lstm.errors import CheckpointError, ConfigError, DataError
from flipout_lstm.fileio import atomic_write_bytes

from .chars import WORD_SEP, word_line_chars
from .vocab import EOS, UNK, Vocab

KINDS = ("word", "char", "ptb_char", "sentencepiece")
SP_UNK = "<sp_unk>"  # sentencepiece matches its unknown piece's text in the input; PTB has "<unk>"
SP_SAMPLE_SENTENCES = 2_000_000  # lines sentencepiece trains on at most (a seeded sample)
SP_SEED = 1234  # sentencepiece's sampling seed: the same text and settings give the same model
SP_THREADS = 8  # fixed: sentencepiece's model depends on its thread count, not on the machine
_EOS_LINE = (EOS,)


def tokenizer_kind(dc) -> str:
    """The tokenizer a data config asks for, from ``data.level``.

    ``char`` means PTB's ``_``-joined view on ``source: ptb`` and plain characters on any other
    source; ``word`` means ``word`` everywhere; ``subword`` means ``sentencepiece``.
    """
    if dc.level == "subword":
        return "sentencepiece"
    if dc.level == "char":
        return "ptb_char" if dc.source == "ptb" else "char"
    return "word"


class Tokenizer:
    """Line <-> ids. Subclasses set :attr:`kind` and implement the token split and decoding."""

    kind: str

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    @property
    def metric_level(self) -> str:
        """The ``data.level`` of this kind: ``'char'`` when a token is one character (bpc per
        token), ``'subword'`` for sentencepiece pieces, else ``'word'`` (both perplexity)."""
        return {"char": "char", "ptb_char": "char", "sentencepiece": "subword"}.get(self.kind, "word")

    # --- encoding ------------------------------------------------------------------
    def tokens(self, line: str) -> Iterable[str]:
        raise NotImplementedError

    def encode_lines(self, lines: list[str]) -> array:
        """The ids of ``lines``, each followed by ``<eos>``, as an ``array('i')``."""
        stream = chain.from_iterable(chain.from_iterable((self.tokens(line), _EOS_LINE) for line in lines))
        unk = self.vocab.unk_id
        ids = array("i", map(self.vocab.stoi.get, stream, repeat(-1 if unk is None else unk)))
        if unk is None and min(ids, default=0) < 0:
            for line in lines:
                bad = next((t for t in self.tokens(line) if t not in self.vocab.stoi), None)
                if bad is not None:
                    raise DataError(f"token {bad!r} is not in the run's {self.kind} vocabulary, which has "
                                    f"no {UNK!r}; remove it from the text")
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: its lines, each but the last followed by ``<eos>``."""
        lines = text.split("\n")
        ids = list(self.encode_lines(lines))
        return ids[:-1]  # the prompt continues: no end of line after its last line

    # --- decoding ------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``: ``<eos>`` becomes a newline."""
        raise NotImplementedError

    # --- persistence ---------------------------------------------------------------
    def model_bytes(self) -> bytes | None:
        return None

    def state(self) -> dict:
        """What a checkpoint stores to rebuild this tokenizer (``"tokenizer"`` key)."""
        return {"kind": self.kind, "model": self.model_bytes()}

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the kind, the vocabulary and the model bytes."""
        digest = hashlib.sha256(self.kind.encode())
        digest.update(json.dumps(self.vocab.itos, ensure_ascii=False).encode())
        digest.update(self.model_bytes() or b"")
        return digest.hexdigest()

    def save(self, run_dir: str | os.PathLike) -> None:
        """``vocab.json`` (and ``tokenizer.model`` for sentencepiece) in the run directory."""
        run_dir = Path(run_dir)
        self.vocab.save(run_dir / "vocab.json")
        if self.model_bytes() is not None:
            atomic_write_bytes(run_dir / "tokenizer.model", self.model_bytes())


class WordTokenizer(Tokenizer):
    kind = "word"

    def tokens(self, line: str) -> list[str]:
        return line.split()

    def decode(self, ids: Iterable[int]) -> str:
        itos = self.vocab.itos
        lines, words = [], []
        for i in ids:
            if int(i) == self.eos_id:
                lines.append(" ".join(words))
                words = []
            else:
                words.append(itos[int(i)])
        return "\n".join(lines + [" ".join(words)])


class CharTokenizer(Tokenizer):
    kind = "char"

    def tokens(self, line: str) -> str:
        return line

    def encode_lines(self, lines: list[str]) -> array:
        """Vectorized: the lines' token text joined by ``\\n`` (which no line contains) is read
        as UTF-32 code points and mapped through a table indexed by code point, ``\\n`` -> eos."""
        table = self._table()
        text = "\n".join(map(self.tokens, lines)) + "\n"
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = table[np.minimum(points, len(table) - 1)]
        if self.vocab.unk_id is None and len(ids) and ids.min() < 0:
            return super().encode_lines(lines)  # names the unknown character
        return array("i", ids.tobytes())

    def _table(self) -> np.ndarray:
        if getattr(self, "_lookup", None) is None:
            singles = {t: i for t, i in self.vocab.stoi.items() if len(t) == 1}
            size = max(map(ord, singles), default=0) + 2  # the last entry catches larger code points
            unk = self.vocab.unk_id
            table = np.full(size, -1 if unk is None else unk, dtype=np.int32)
            for t, i in singles.items():
                table[ord(t)] = i
            table[ord("\n")] = self.eos_id
            self._lookup = table
        return self._lookup

    def decode(self, ids: Iterable[int]) -> str:
        itos, eos = self.vocab.itos, self.eos_id
        return "".join("\n" if int(i) == eos else itos[int(i)] for i in ids)


class PTBCharTokenizer(CharTokenizer):
    """PTB's character level: words joined by ``_``; decoding shows ``_`` as a space."""

    kind = "ptb_char"

    def tokens(self, line: str) -> str:
        return word_line_chars(line)

    def decode(self, ids: Iterable[int]) -> str:
        return super().decode(ids).replace(WORD_SEP, " ")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self.model = bytes(model)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        except (RuntimeError, OSError, TypeError) as exc:
            raise CheckpointError(f"the saved sentencepiece model does not load ({' '.join(str(exc).split())}); "
                                  f"retrain the run") from None
        if self.sp.piece_to_id(EOS) != 0:
            raise CheckpointError("the sentencepiece model's id 0 is not <eos>; train it with this trainer")
        super().__init__(Vocab([self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]))

    def encode_lines(self, lines: list[str]) -> array:
        ids = array("i")
        for pieces in self.sp.encode(lines):
            ids.extend(pieces)
            ids.append(0)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        lines, current = [], []
        for i in ids:
            if int(i) == 0:
                lines.append(current)
                current = []
            else:
                current.append(int(i))
        return "\n".join(self.sp.decode(piece_ids) for piece_ids in lines + [current])

    def model_bytes(self) -> bytes:
        return self.model


# ----------------------------------------------------------------------------- building


def build_vocab(kind: str, lines: Iterable[str], min_count: int = 1) -> Vocab:
    """A word or character vocabulary from the training lines (see the module docstring)."""
    split = {"word": str.split, "char": lambda s: s, "ptb_char": word_line_chars}[kind]
    counts: Counter = Counter()
    for line in lines:
        counts.update(split(line))  # a Counter keeps first-occurrence order
    counts.pop(EOS, None)
    kept = [t for t, n in counts.items() if n >= min_count]
    if kind != "ptb_char" and UNK not in kept:
        kept.append(UNK)
    if len(kept) == (1 if kind != "ptb_char" else 0):
        raise DataError(f"the training split yields no {kind} tokens"
                        + (f" seen {min_count}+ times; lower data.min_count" if min_count > 1 else
                           "; check the training text"))
    return Vocab([EOS, *kept])


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    """Train a sentencepiece model on ``lines`` (streamed; at most a seeded sample of
    :data:`SP_SAMPLE_SENTENCES` lines is held) and return the model file's bytes."""
    import sentencepiece as spm

    spm.set_random_generator_seed(SP_SEED)
    out = io.BytesIO()
    nonempty = (line for line in lines if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=nonempty, model_writer=out, vocab_size=vocab_size, model_type=model_type,
            pad_id=-1, bos_id=-1, eos_id=0, unk_id=1, eos_piece=EOS, unk_piece=SP_UNK,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            character_coverage=1.0, input_sentence_size=SP_SAMPLE_SENTENCES,
            shuffle_input_sentence=True, num_threads=SP_THREADS, minloglevel=2)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        most = re.search(r"value <= (\d+)", text)
        if most:
            raise ConfigError(f"data.vocab_size={vocab_size} is too large for this training text "
                              f"(sentencepiece allows at most {most.group(1)}); lower data.vocab_size") from None
        raise DataError(f"sentencepiece training failed ({text}); check the training text and "
                        f"data.vocab_size") from None
    return out.getvalue()


def make_tokenizer(kind: str, vocab: Vocab | None = None, model: bytes | None = None) -> Tokenizer:
    """A tokenizer from its saved parts: a vocabulary (word/char kinds) or model bytes."""
    if kind == "sentencepiece":
        if not model:
            raise CheckpointError("the checkpoint has no sentencepiece model; retrain the run")
        return SentencePieceTokenizer(model)
    classes = {"word": WordTokenizer, "char": CharTokenizer, "ptb_char": PTBCharTokenizer}
    if kind not in classes:
        raise CheckpointError(f"unknown tokenizer kind {kind!r} in the checkpoint; expected one of "
                              f"{', '.join(KINDS)}")
    return classes[kind](vocab)


def tokenizer_from_checkpoint(ckpt: dict, dc, source: str) -> Tokenizer:
    """The training run's tokenizer from a checkpoint (older ones lack ``"tokenizer"``: the
    kind then follows the config, as it did when they were written)."""
    vocab = Vocab.from_dict(ckpt["vocab"], source=source)
    state = ckpt.get("tokenizer") or {"kind": tokenizer_kind(dc), "model": None}
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a malformed tokenizer entry; use a checkpoint written by train.py")
    tok = make_tokenizer(state.get("kind"), vocab, state.get("model"))
    if tok.vocab != vocab:
        raise CheckpointError(f"{source}: the sentencepiece model and the vocabulary disagree; "
                              f"use a checkpoint written by train.py")
    return tok


__all__ = ["KINDS", "tokenizer_kind", "Tokenizer", "WordTokenizer", "CharTokenizer", "PTBCharTokenizer",
           "SentencePieceTokenizer", "build_vocab", "train_sentencepiece", "make_tokenizer",
           "tokenizer_from_checkpoint"]
