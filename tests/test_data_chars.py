"""The character view of PTB must reproduce Mikolov's ptb.char.*.txt byte for byte."""
import pytest

from flipout_lstm.data import char_corpus_text, word_line_to_chars


def test_word_line_to_chars():
    assert word_line_to_chars(" the <unk> fell \n") == list("the_<unk>_fell")
    assert word_line_to_chars(" a \n") == ["a"]
    assert word_line_to_chars(" \n") == []
    assert word_line_to_chars("N") == ["N"]


def test_char_corpus_text_layout():
    word = " no it \n but N <unk> \n"
    assert char_corpus_text(word) == "n o _ i t \n b u t _ N _ < u n k > \n "
    assert char_corpus_text(" no it ") == "n o _ i t \n "  # a last line without newline still ends one


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_char_files_match_reference(shared_ptb, split):
    word = (shared_ptb / f"ptb.{split}.txt").read_bytes().decode("utf-8")
    ref = (shared_ptb / f"ptb.char.{split}.txt").read_bytes()
    got = char_corpus_text(word).encode("utf-8")
    assert got[:200] == ref[:200] and got[-200:] == ref[-200:]
    assert got == ref
