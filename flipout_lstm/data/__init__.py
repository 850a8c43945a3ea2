"""The data pipeline: PTB, or any text corpus, as id streams.

* :mod:`flipout_lstm.data.ptb` -- locate, download and verify ``ptb.{train,valid,test}.txt``.
* :mod:`flipout_lstm.data.sources` -- the lines of each split: PTB, text files or a ``datasets`` dataset.
* :mod:`flipout_lstm.data.tokenizers` -- word, character and sentencepiece tokenizers.
* :mod:`flipout_lstm.data.cache` -- trained tokenizers and encoded splits cached on disk (memmap).
* :mod:`flipout_lstm.data.chars` -- the character-level view of a word line / file.
* :mod:`flipout_lstm.data.vocab` -- :class:`Vocab` (token <-> id, ``<eos>`` first).
* :mod:`flipout_lstm.data.corpus` -- :func:`open_corpus` -> :class:`Corpus` of id streams.
* :mod:`flipout_lstm.data.batching` -- :class:`TrainStream` / :class:`EvalStream`.
"""
from .batching import Batch, EvalBatch, EvalStream, TrainStream
from .chars import char_corpus_text, word_line_to_chars
from .corpus import Corpus, open_corpus
from .ptb import PTB_SHA256, PTB_URL, prepare_ptb
from .sources import SOURCES
from .tokenizers import KINDS, Tokenizer, tokenizer_from_checkpoint, tokenizer_kind
from .vocab import Vocab

__all__ = [
    "PTB_URL", "PTB_SHA256", "prepare_ptb", "open_corpus", "Corpus", "Vocab",
    "SOURCES", "KINDS", "Tokenizer", "tokenizer_from_checkpoint", "tokenizer_kind",
    "word_line_to_chars", "char_corpus_text", "TrainStream", "Batch", "EvalBatch", "EvalStream",
]
