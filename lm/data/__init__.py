"""The Penn Treebank data pipeline.

* :mod:`lm.data.ptb` -- locate, download and verify ``ptb.{train,valid,test}.txt``.
* :mod:`lm.data.chars` -- the character-level view of a word line / file.
* :mod:`lm.data.vocab` -- :class:`Vocab` (token <-> id, ``<eos>`` first).
* :mod:`lm.data.corpus` -- :func:`load_corpus` -> :class:`Corpus` of id streams.
* :mod:`lm.data.batching` -- :class:`TrainStream` / :func:`eval_batches`.
"""
from .batching import Batch, EvalBatch, TrainStream, eval_batches
from .chars import char_corpus_text, word_line_to_chars
from .corpus import Corpus, load_corpus
from .ptb import PTB_SHA256, PTB_URL, prepare_ptb
from .vocab import Vocab

__all__ = [
    "PTB_URL", "PTB_SHA256", "prepare_ptb", "load_corpus", "Corpus", "Vocab",
    "word_line_to_chars", "char_corpus_text", "TrainStream", "Batch", "eval_batches", "EvalBatch",
]
