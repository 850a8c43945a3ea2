"""The character-level view of PTB, derived from the word files.

One word line becomes its characters, one token per character, with ``_`` between
words; ``<unk>`` is just five characters ``< u n k >``. For example the word line
``" the <unk> fell \\n"`` gives the tokens
``t h e _ < u n k > _ f e l l``.

The reference files ``ptb.char.{train,valid,test}.txt`` write every token followed
by one space, and the end of each line as a ``"\\n"`` token that is itself followed
by one space. So a line's text is ``"t h e _ f e l l \\n "``: the file starts with
the first character (no leading space), every line after the first starts with a
space (the one that follows the previous ``"\\n"``), and the file ends in ``"\\n "``.
:func:`char_corpus_text` reproduces those files byte for byte.
"""
from __future__ import annotations

WORD_SEP = "_"
"""Token written between the words of a line at the character level."""


def word_line_chars(line: str) -> str:
    """The characters of one word line as a single string (words joined by ``_``)."""
    return WORD_SEP.join(line.split())


def word_line_to_chars(line: str) -> list[str]:
    """The character tokens of one word line: one per character, ``_`` between words.

    Leading/trailing whitespace and the newline are dropped (the end of line is
    represented by the vocabulary's ``<eos>`` token, added by the encoder).
    """
    return list(word_line_chars(line))


def text_lines(text: str) -> list[str]:
    """Split a file's text into lines on ``"\\n"``; a final newline does not open a new line.

    A last line without a newline still counts as a line.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def char_corpus_text(word_text: str) -> str:
    """The text of ``ptb.char.<split>.txt`` derived from the text of ``ptb.<split>.txt``.

    Every character token and every end of line (``"\\n"``) is followed by one space.
    """
    parts = []
    for line in text_lines(word_text):
        chars = word_line_chars(line)
        parts.append(" ".join(chars) + " \n " if chars else "\n ")
    return "".join(parts)


__all__ = ["WORD_SEP", "word_line_chars", "word_line_to_chars", "text_lines", "char_corpus_text"]
