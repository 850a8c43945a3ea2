"""Any corpus, any tokenizer: text files, datasets saved to disk, the encoding cache, bpc of the
raw text, config errors, and the WikiText recipes' dry runs (all offline)."""
import json
import math

import numpy as np
import pytest
import torch

import train as train_script
from conftest import REPO, run_cli
from flipout_lstm.config import load_config
from flipout_lstm.data import open_corpus
from flipout_lstm.data import cache as cache_module
from flipout_lstm.data import corpus as corpus_module
from flipout_lstm.data.sources import TextFileSplit, row_lines
from flipout_lstm.data.tokenizers import build_vocab, make_tokenizer, train_sentencepiece
from flipout_lstm.errors import ConfigError, DataError
from flipout_lstm.evaluation import raw_bpc
from flipout_lstm.model import LanguageModel

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "and", "big", "Über", "café,", "quickly",
         "slowly", "over", "under", "yesterday", "jumped", "green", "house", "river", "of", "to", "(", ")"]


def write_text_corpus(folder, seed=0):
    """Three small text files: blank lines, non-ASCII text, the test file without a final newline."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", 300), ("valid", 30), ("test", 30)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 10))) for _ in range(n)]
        text = "\n".join(lines) + ("" if split == "test" else "\n")
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text(text, encoding="utf-8")
    return paths


def file_lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def raw_chars(path):
    """Each line's characters plus one for its end (the definition in flipout_lstm.data.cache)."""
    return sum(len(line) + 1 for line in file_lines(path))


def text_overrides(paths, cache, **extra):
    base = {"data.source": "text", "data.train": paths["train"], "data.valid": paths["valid"],
            "data.test": paths["test"], "data.cache_dir": cache}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def data_config(overrides):
    return load_config(None, overrides).data


@pytest.fixture
def corpus_files(tmp_path):
    return write_text_corpus(tmp_path / "corpus")


# ----------------------------------------------------------------------------- lines and tokens


def test_text_file_lines_and_dataset_rows():
    assert row_lines("a b\n") == ["a b"] and row_lines("") == [""] and row_lines(None) == [""]
    assert row_lines("a\nb") == ["a", "b"] and row_lines("a\n\n") == ["a", ""]


def test_text_file_line_definition(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("a b\n\nc\r\nd".encode())  # blank line, CRLF, no final newline
    split = TextFileSplit(path, "data.train")
    assert list(split.lines()) == ["a b", "", "c", "d"]
    tok = make_tokenizer("char", build_vocab("char", split.lines()))
    ids, info = cache_module.Cache(tmp_path / "cache").encoded(tok, split)
    assert info == {**info, "lines": 4, "chars": 4 + 1 + 2 + 2, "tokens": 9}
    assert tok.decode(ids) == "a b\n\nc\nd\n"


def test_word_vocabulary_min_count_and_unk():
    vocab = build_vocab("word", ["a b a", "c a b", ""], min_count=2)
    assert vocab.itos == ["<eos>", "a", "b", "<unk>"]
    tok = make_tokenizer("word", vocab)
    assert list(tok.encode_lines(["a zz c", "b"])) == [1, 3, 3, 0, 2, 0]
    assert tok.decode([1, 3, 0, 2]) == "a <unk>\nb"


def test_word_tokenizer_on_ptb_is_the_ptb_word_level(tiny_ptb, tmp_path):
    level = open_corpus(data_config([f"data.root={tiny_ptb}", "data.level=word"]))  # PTB's reader
    # data.min_count asks for the vocabulary rebuilt from the text, by the generic path.
    generic = open_corpus(data_config([f"data.root={tiny_ptb}", "data.level=word", "data.min_count=1",
                                       f"data.cache_dir={tmp_path}"]))
    assert generic.vocab == level.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(generic.split(split), level.split(split))


def test_ptb_char_decodes_underscores_as_spaces():
    tok = make_tokenizer("ptb_char", build_vocab("ptb_char", [" the cat sat "]))
    ids = list(tok.encode_lines([" the cat ", "sat"]))
    assert [tok.vocab.itos[i] for i in ids[:7]] == list("the_cat") and ids[7] == tok.eos_id
    assert tok.decode(ids) == "the cat\nsat\n"


def test_char_bpc_raw_equals_bpc(corpus_files, tmp_path):
    corpus = open_corpus(data_config(text_overrides(corpus_files, tmp_path / "cache",
                                                    **{"data.level": "char"})))
    assert corpus.level == "char" and "<unk>" in corpus.vocab
    for split in ("train", "valid", "test"):
        # one token per character, one <eos> per line: the raw text's character count
        assert corpus.split(split).numel() == corpus.chars[split] == raw_chars(corpus_files[split])
    assert raw_bpc(1.5, 1000, 1000)["bpc_raw"] == pytest.approx(1.5 / math.log(2))
    assert raw_bpc(1.5, 1000, 4000)["bpc_raw"] == pytest.approx(1.5 * 1000 / math.log(2) / 4000)
    assert raw_bpc(1.5, 1000, None) == {}


def test_sentencepiece_is_lossless_and_eos_is_zero(corpus_files):
    lines = file_lines(corpus_files["train"])
    tok = make_tokenizer("sentencepiece", model=train_sentencepiece(iter(lines), 40, "bpe"))
    assert len(tok) == 40 and tok.eos_id == 0 and tok.vocab.itos[0] == "<eos>"
    ids = list(tok.encode_lines(lines))
    assert ids.count(0) == len(lines)
    assert tok.decode(ids) == "\n".join(lines) + "\n"  # no normalization, whitespace kept
    again = make_tokenizer("sentencepiece", model=tok.model_bytes())  # as a checkpoint rebuilds it
    assert list(again.encode_lines(lines)) == ids and again.fingerprint == tok.fingerprint


def test_sentencepiece_vocabulary_too_large_is_a_config_error(corpus_files):
    with pytest.raises(ConfigError, match=r"data.vocab_size=5000 is too large .* at most \d+\); lower"):
        train_sentencepiece(iter(file_lines(corpus_files["train"])), 5000, "unigram")


# ----------------------------------------------------------------------------- the cache


def test_second_open_reads_the_cache(corpus_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    overrides = text_overrides(corpus_files, cache, **{"data.level": "subword",
                                                       "data.vocab_size": 40})
    encodes, trainings = [], []
    real_encode, real_train = cache_module.Cache._encode, corpus_module.train_sentencepiece
    monkeypatch.setattr(cache_module.Cache, "_encode",
                        staticmethod(lambda tok, text, *a: encodes.append(text.description)
                                     or real_encode(tok, text, *a)))
    monkeypatch.setattr(corpus_module, "train_sentencepiece",
                        lambda *a: trainings.append(1) or real_train(*a))
    first = open_corpus(data_config(overrides))
    assert len(encodes) == 3 and len(trainings) == 1
    bins = sorted((cache / "encoded").glob("*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in bins]
    second = open_corpus(data_config(overrides))
    assert len(encodes) == 3 and len(trainings) == 1  # neither re-trained nor re-encoded
    assert [p.stat().st_mtime_ns for p in bins] == mtimes
    for split in ("train", "valid", "test"):
        assert torch.equal(first.split(split), second.split(split))
        assert first.chars[split] == second.chars[split] == raw_chars(corpus_files[split])
    stored = np.memmap(bins[0], dtype="<i4", mode="r")
    assert any(np.array_equal(stored, first.split(s).numpy()) for s in ("train", "valid", "test"))

    # New content in one file: only that split is encoded again.
    with open(corpus_files["valid"], "a", encoding="utf-8") as fh:
        fh.write("the big dog\n")
    third = open_corpus(data_config(overrides))
    assert encodes[3:] == [str(corpus_files["valid"])] and len(trainings) == 1
    assert third.split("valid").numel() > first.split("valid").numel()

    # A damaged entry (a .bin cut short) is encoded again instead of trusted.
    for path in (cache / "encoded").glob("*.bin"):
        path.write_bytes(path.read_bytes()[:4])
    fourth = open_corpus(data_config(overrides))
    assert len(encodes) == 4 + 3
    assert torch.equal(fourth.split("train"), first.split("train"))


# ----------------------------------------------------------------------------- datasets


def save_dataset_dict(corpus_files, folder, split_names=("train", "validation", "test")):
    """The text files as a DatasetDict, one row per line (WikiText's layout), saved to disk."""
    import datasets

    splits = {}
    for name, split in zip(split_names, ("train", "valid", "test")):
        rows = [line + "\n" if line else "" for line in file_lines(corpus_files[split])]
        splits[name] = datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))})
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_dataset_saved_to_disk_reads_like_the_text_files(corpus_files, tmp_path):
    folder = save_dataset_dict(corpus_files, tmp_path / "ds")
    hf = open_corpus(data_config(["data.source=hf", f"data.path={folder}", "data.level=word",
                                  f"data.cache_dir={tmp_path / 'cache'}"]))
    text = open_corpus(data_config(text_overrides(corpus_files, tmp_path / "cache",
                                                  **{"data.level": "word"})))
    assert hf.vocab == text.vocab and hf.chars == text.chars
    for split in ("train", "valid", "test"):
        assert torch.equal(hf.split(split), text.split(split))


def test_dataset_errors(corpus_files, tmp_path):
    import datasets

    folder = save_dataset_dict(corpus_files, tmp_path / "ds")
    cases = [
        ([f"data.path={folder}", "data.valid_split=dev"], r"has no split 'dev' \(it has train, validation, test\)"),
        ([f"data.path={folder}", "data.text_field=body"], r"has no column 'body' \(columns: text, n\); set data.text_field"),
        ([f"data.path={folder}", "data.text_field=n"], r"column 'n' holds .*int64.*, not text"),
        ([f"data.path={tmp_path / 'nowhere'}"], r"data.path .*nowhere is not a folder"),
    ]
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(single))
    cases.append(([f"data.path={single}"], r"holds a single Dataset, not a DatasetDict"))
    for extra, message in cases:
        with pytest.raises(DataError, match=message):
            open_corpus(data_config(["data.source=hf", "data.level=word",
                                     f"data.cache_dir={tmp_path / 'cache'}", *extra]))


def test_offline_dataset_not_in_the_cache_is_a_one_line_error(tmp_path):
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    proc = run_cli("train.py", "recipes/wikitext2_word.yaml", f"train.out_dir={tmp_path / 'runs'}",
                   f"data.cache_dir={tmp_path / 'cache'}", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error: dataset 'wikitext' (config 'wikitext-2-raw-v1') "
                                              "is not in the local datasets cache")
    assert "run once with a network connection" in err and "data.path=FOLDER" in err


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, message", [
    (["data.source=web"], r"data.source: 'web' is not one of 'ptb', 'text', 'hf'"),
    (["data.source=text", "data.train=a.txt"], r"data.valid: data.source=text needs data.train, data.valid and data.test"),
    (["data.train=a.txt"], r"data.train: belongs to data.source=text, but the source is ptb"),
    (["data.source=text", "data.train=a", "data.valid=b", "data.test=c", "data.name=wikitext"],
     r"data.name: belongs to data.source=hf"),
    (["data.source=hf"], r"data.name: data.source=hf needs a dataset: data.name"),
    (["data.level=subword"], r"data.vocab_size: data.level=subword needs data.vocab_size"),
    (["data.level=word", "data.vocab_size=500"], r"data.vocab_size: only applies to data.level=subword \(the level is word\)"),
    (["data.level=word", "data.sp_model=bpe"], r"data.sp_model: only applies to data.level=subword"),
    (["data.level=subword", "data.vocab_size=2"], r"data.vocab_size: must be at least 3"),
    (["data.level=char", "data.min_count=2"], r"data.min_count: only applies to data.level=word \(the level is char\)"),
    (["data.level=bpe"], r"data.level: 'bpe' is not one of 'char', 'word', 'subword'"),
    (["data.tokenizer=word"], r"unknown config key 'data.tokenizer' \(it was replaced by data.level"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "recipes/char_ptb.yaml", overrides)


def test_missing_text_file_is_a_one_line_error(corpus_files, tmp_path):
    overrides = text_overrides({**corpus_files, "valid": tmp_path / "nope.txt"}, tmp_path / "cache")
    with pytest.raises(DataError, match=r"data.valid file .*nope.txt not found; set data.valid"):
        open_corpus(data_config(overrides))


@pytest.mark.parametrize("recipe", ["wikitext2_word", "wikitext2_sp", "wikitext103_word", "wikitext103_sp"])
def test_wikitext_recipes_dry_run_without_data(recipe, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("--dry-run read the corpus")

    monkeypatch.setattr(train_script, "open_corpus", no_data)
    assert train_script.main([str(REPO / "recipes" / f"{recipe}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml")
    assert cfg.data.source == "hf" and cfg.data.name == "wikitext"
    assert "network" in (REPO / "recipes" / f"{recipe}.yaml").read_text().lower()
    count = out.strip().splitlines()[-1]
    if cfg.data.level == "subword":
        assert count == f"# parameters: {LanguageModel(cfg.model, cfg.data.vocab_size).num_parameters():,}"
    else:  # a + b V: check it against a model of 1000 words
        a, b = (int(x.replace(",", "")) for x in count.split()[2:5:2])
        assert a + 1000 * b == LanguageModel(cfg.model, 1000).num_parameters()
        assert "per vocabulary entry" in count


def test_metrics_record_bpc_raw_for_ptb(tiny_ptb, tmp_path):
    from conftest import tiny_overrides

    assert train_script.main([str(REPO / "recipes/word_ptb.yaml"),
                              *tiny_overrides(tiny_ptb, tmp_path, **{"train.max_steps": 3})]) == 0
    lines = [json.loads(x) for x in (tmp_path / "word_ptb" / "metrics.jsonl").read_text().splitlines()]
    test = lines[-1]
    chars = raw_chars(tiny_ptb / "ptb.test.txt")
    assert test["split"] == "test" and test["bpc_raw"] == pytest.approx(
        test["loss"] * test["tokens"] / math.log(2) / chars, rel=1e-12)


@pytest.mark.parametrize("recipe, level", [("wikitext2_word", "word"), ("wikitext2_sp", "subword"),
                                           ("wikitext103_word", "word"), ("wikitext103_sp", "subword")])
def test_one_field_decides_the_kind_of_token(recipe, level):
    """data.level alone: the WikiText word and sentencepiece recipes get the word-level warm-up
    and metric, not the character defaults (they once resolved as level char)."""
    from flipout_lstm.data.tokenizers import tokenizer_kind
    from flipout_lstm.evaluation import DEFAULT_WARMUP, eval_warmup
    from flipout_lstm.scores import metric

    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml")
    assert cfg.data.level == level
    assert eval_warmup(cfg.data) == DEFAULT_WARMUP["word"] != DEFAULT_WARMUP["char"]
    assert metric(cfg.data.level) == "ppl"
    assert tokenizer_kind(cfg.data) == ("sentencepiece" if level == "subword" else "word")


@pytest.mark.parametrize("tokenizer, level", [("sentencepiece", "subword"), ("word", "word"),
                                              ("char", "char"), (None, "char")])
def test_checkpoints_written_with_data_tokenizer_still_load(tokenizer, level):
    """Configs saved before data.level became the one field carry data.tokenizer."""
    from flipout_lstm.config import Config, config_from_dict

    raw = Config().to_dict()
    raw["data"]["tokenizer"] = tokenizer
    if tokenizer == "sentencepiece":
        raw["data"]["vocab_size"] = 100
    assert config_from_dict(raw).data.level == level


def test_cache_files_honour_the_umask(corpus_files, tmp_path):
    """The encoded splits and the tokenizer are written like run files: the umask decides who
    may read them (a shared cache on a shared machine), not a fixed 0600."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        open_corpus(data_config(text_overrides(corpus_files, tmp_path / "cache", **{"data.level": "word"})))
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert not [p for p in written if p.name.endswith(".tmp")]
