"""Vocab: deterministic order, encoding, out-of-vocabulary handling, persistence."""
import json

import pytest
import torch

from flipout_lstm.data import Vocab
from flipout_lstm.errors import DataError


def test_build_order_and_properties():
    v = Vocab.build([["b", "a", "b"], ["c", "<unk>"], []])
    assert v.itos == ["<eos>", "b", "a", "c", "<unk>"]
    assert v.stoi == {t: i for i, t in enumerate(v.itos)}
    assert len(v) == 5 and v.eos == "<eos>" and v.eos_id == 0 and v.unk == "<unk>" and v.unk_id == 4
    assert Vocab.build(["ba", "c"]).itos == ["<eos>", "b", "a", "c"]  # strings are character lines
    assert Vocab.build([["x"]]).unk is None


def test_encode_stream_with_eos():
    v = Vocab.build([["a", "b"], ["c"]])
    out = v.encode([["a", "b"], [], ["c", "a"]], source="f")
    assert out.dtype == torch.long and out.dim() == 1
    assert out.tolist() == [1, 2, 0, 0, 3, 1, 0]
    assert v.decode(out)[:3] == ["a", "b", "<eos>"]
    assert v.encode([], source="f").tolist() == []


def test_oov_maps_to_unk():
    v = Vocab.build([["a", "<unk>"]])
    assert v.encode([["a", "zzz"]], source="f").tolist() == [1, 2, 0]


def test_oov_without_unk_names_token_file_line():
    v = Vocab.build(["abc"])
    with pytest.raises(DataError) as e:
        v.encode(["ab", "cba", "abQc"], source="/x/ptb.valid.txt")
    msg = str(e.value)
    assert "'Q'" in msg and "/x/ptb.valid.txt" in msg and "line 3" in msg and "\n" not in msg


def test_duplicates_and_missing_eos_rejected():
    with pytest.raises(DataError, match="twice"):
        Vocab(["<eos>", "a", "a"])
    with pytest.raises(DataError, match="<eos>"):
        Vocab(["a"])


def test_save_load_roundtrip(tmp_path):
    v = Vocab.build([["é", "b"], ["<unk>"]])
    p = tmp_path / "vocab.json"
    v.save(p)
    assert Vocab.load(p) == v and Vocab.from_dict(v.to_dict()).itos == v.itos
    assert json.loads(p.read_text(encoding="utf-8"))["itos"] == v.itos
    assert [q.name for q in tmp_path.iterdir()] == ["vocab.json"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"itos": "abc"}', b'{"itos": ["a"]}',
                                     b'{"itos": ["<eos>", 3]}', b"\xff\xfe", b'{"format": "x", "itos": ["<eos>"]}'])
def test_load_malformed(tmp_path, content):
    p = tmp_path / "vocab.json"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        Vocab.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_load_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Vocab.load(tmp_path / "none.json")
