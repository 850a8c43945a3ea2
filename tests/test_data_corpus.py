"""PTB through open_corpus: the real corpus (counts from the paper) and small broken ones."""
import pytest
import torch

from flipout_lstm.config import DataConfig
from flipout_lstm.data import Corpus, open_corpus
from flipout_lstm.errors import ConfigError, DataError


def ptb_corpus(level, root, vocab=None):
    """PTB's files in ``root`` at ``level``, with a checkpoint's vocabulary where given."""
    saved = None if vocab is None else {"vocab": vocab.to_dict()}
    return open_corpus(DataConfig(level=level, root=str(root), download=False), saved=saved)


@pytest.fixture(scope="module")
def word(ptb_root):
    return ptb_corpus("word", ptb_root)


@pytest.fixture(scope="module")
def char(ptb_root):
    return ptb_corpus("char", ptb_root)


def test_word_counts(word):
    assert isinstance(word, Corpus) and word.level == "word"
    assert (len(word.train), len(word.valid), len(word.test)) == (929_589, 73_760, 82_430)
    assert len(word.vocab) == 10_000 and word.vocab.unk == "<unk>" and word.vocab.itos[0] == "<eos>"
    for s in (word.train, word.valid, word.test):
        assert s.dtype == torch.long and s.dim() == 1 and int(s.max()) < 10_000 and int(s.min()) >= 0
    assert int((word.train == word.vocab.eos_id).sum()) == 42_068
    # first line of ptb.train.txt: " aer banknote berlitz ..."
    assert word.vocab.decode(word.train[:3]) == ["aer", "banknote", "berlitz"]


def test_char_counts(char):
    assert char.level == "char"
    assert (len(char.train), len(char.valid), len(char.test)) == (5_017_482, 393_042, 442_423)
    assert len(char.vocab) == 50 and char.vocab.unk is None and "_" in char.vocab


def test_char_stream_matches_reference_file(char, shared_ptb):
    """The char stream is the reference char file read token by token, its '\\n' read as <eos>."""
    tokens = [t for t in (shared_ptb / "ptb.char.valid.txt").read_text(encoding="utf-8").split(" ") if t]
    ids = torch.tensor([char.vocab.eos_id if t == "\n" else char.vocab.stoi[t] for t in tokens])
    assert torch.equal(ids, char.valid)


def test_given_vocab_is_used(word, ptb_root):
    again = ptb_corpus("word", ptb_root, vocab=word.vocab)
    assert again.vocab == word.vocab and torch.equal(again.valid, word.valid)


def synth(root, train=" a b c \n b a \n", valid=" a c \n", test=" c \n"):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"ptb.{name}.txt").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return root


def test_small_corpus(tmp_path):
    c = ptb_corpus("word", synth(tmp_path))
    assert c.vocab.itos == ["<eos>", "a", "b", "c"]
    assert c.train.tolist() == [1, 2, 3, 0, 2, 1, 0] and c.valid.tolist() == [1, 3, 0]
    ch = ptb_corpus("char", tmp_path)
    assert ch.vocab.itos == ["<eos>", "a", "_", "b", "c"]
    assert ch.test.tolist() == [4, 0]


def test_oov_in_valid_without_unk(tmp_path):
    root = synth(tmp_path, valid=" a c \n a zebra \n")
    with pytest.raises(DataError) as e:
        ptb_corpus("word", root)
    msg = str(e.value)
    assert "'zebra'" in msg and "ptb.valid.txt" in msg and "line 2" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"'z' in .*ptb.valid.txt line 2"):
        ptb_corpus("char", root)


def test_oov_with_unk_maps_to_unk(tmp_path):
    c = ptb_corpus("word", synth(tmp_path, train=" a <unk> \n", valid=" zebra a \n"))
    assert c.valid.tolist() == [c.vocab.unk_id, 1, 0]


def test_missing_empty_non_utf8(tmp_path):
    root = synth(tmp_path / "x")
    (root / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match=r"PTB files missing from .*x: ptb.test.txt; .*set data.root"):
        ptb_corpus("word", root)
    synth(root, valid="")
    with pytest.raises(DataError, match="ptb.valid.txt is empty"):
        ptb_corpus("word", root)
    synth(root, train=b" \xff\xfe \n")
    with pytest.raises(DataError, match="ptb.train.txt is not UTF-8"):
        ptb_corpus("char", root)


def test_bad_level(tmp_path):
    with pytest.raises(ConfigError, match="level"):
        ptb_corpus("byte", synth(tmp_path))
