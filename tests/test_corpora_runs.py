"""Training, resuming, evaluating and sampling on corpora other than PTB's own levels."""
import json
import math
import shutil

import pytest
import torch

import evaluate as evaluate_script
import train as train_script
from conftest import REPO, metrics, tiny_overrides
from flipout_lstm import checkpoint
from flipout_lstm import sample as sample_script
from flipout_lstm.config import config_from_dict
from flipout_lstm.data import tokenizer_from_checkpoint
from flipout_lstm.model import LanguageModel
from test_corpora import raw_chars, save_dataset_dict, text_overrides, write_text_corpus

RUN_SETTINGS = {"data.batch_size": 4, "data.bptt": 10, "data.eval_batch_size": 4,
                "model.hidden_size": 16, "model.embedding_size": 16, "train.progress": "false",
                "train.tensorboard": "false", "train.log_every": 2, "train.eval_every": 3}


def train(overrides, out, name, *extra):
    settings = {**RUN_SETTINGS, "train.out_dir": out, "train.run_name": name}
    return train_script.main([str(REPO / "recipes/word_ptb.yaml"), *overrides,
                              *[f"{k}={v}" for k, v in settings.items()], *extra])


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    """A sentencepiece run on text files: 6 steps, then resumed to 8."""
    tmp = tmp_path_factory.mktemp("sp")
    files = write_text_corpus(tmp / "corpus")
    overrides = text_overrides(files, tmp / "cache", **{"data.level": "subword",
                                                        "data.vocab_size": 40, "data.sp_model": "bpe"})
    assert train(overrides, tmp / "runs", "sp", "train.max_steps=6") == 0
    return {"files": files, "overrides": overrides, "run": tmp / "runs" / "sp", "tmp": tmp}


def test_sentencepiece_run_keeps_its_tokenizer(sp_run):
    run = sp_run["run"]
    model_file = (run / "tokenizer.model").read_bytes()
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.load(run / name)
        assert ckpt["tokenizer"]["kind"] == "sentencepiece" and ckpt["tokenizer"]["model"] == model_file
        assert len(ckpt["vocab"]["itos"]) == 40 and ckpt["model"]["decoder.weight"].shape[0] == 40
    assert json.loads((run / "vocab.json").read_text())["itos"][0] == "<eos>"


def test_sentencepiece_run_logs_bpc_of_the_raw_text(sp_run):
    lines = metrics(sp_run["run"])
    final = {line["split"]: line for line in lines if line.get("best")}
    for split in ("valid", "test"):
        line = final[split]
        assert "ppl" in line and "bpc" not in line
        expected = line["loss"] * line["tokens"] / math.log(2) / raw_chars(sp_run["files"][split])
        assert line["bpc_raw"] == pytest.approx(expected, rel=1e-12)
    assert all("bpc_raw" in line for line in lines if line["split"] == "valid")


def test_evaluate_rebuilds_the_run_tokenizer(sp_run):
    best = sp_run["run"] / "best.pt"
    test_line = [line for line in metrics(sp_run["run"]) if line["split"] == "test"][-1]
    first = evaluate_script.run(evaluate_script.parse_args([str(best), "--split", "test"]))
    # Without the cache, the checkpoint's own sentencepiece model re-encodes the text files.
    shutil.rmtree(sp_run["tmp"] / "cache")
    second = evaluate_script.run(evaluate_script.parse_args([str(best), "--split", "test"]))
    for result in (first, second):
        assert result["level"] == "subword" and result["tokens"] == test_line["tokens"]
        assert result["loss"] == pytest.approx(test_line["loss"], rel=1e-6)
        assert result["bpc_raw"] == pytest.approx(test_line["bpc_raw"], rel=1e-6)


def test_resume_uses_the_checkpoint_tokenizer(sp_run, capsys):
    tmp = sp_run["tmp"]
    changed = sp_run["overrides"][:-1] + ["data.sp_model=unigram"]
    assert train(changed, tmp / "runs", "sp", "train.max_steps=8", "--resume") == 2
    assert "data.sp_model (checkpoint 'bpe', now 'unigram')" in capsys.readouterr().err
    assert train(sp_run["overrides"], tmp / "runs", "sp", "train.max_steps=8", "--resume") == 0
    assert checkpoint.load(sp_run["run"] / "last.pt")["progress"]["step"] == 8


def test_text_word_run_with_min_count(tmp_path):
    files = write_text_corpus(tmp_path / "corpus")
    counts = {}
    for line in files["train"].read_text(encoding="utf-8").splitlines():
        for word in line.split():
            counts[word] = counts.get(word, 0) + 1
    threshold = sorted(counts.values())[len(counts) // 2]  # about half the words are kept
    overrides = text_overrides(files, tmp_path / "cache", **{"data.level": "word",
                                                              "data.min_count": threshold})
    assert train(overrides, tmp_path / "runs", "w", "train.max_steps=3") == 0
    itos = json.loads((tmp_path / "runs" / "w" / "vocab.json").read_text())["itos"]
    kept = [w for w, n in counts.items() if n >= threshold]
    assert 0 < len(kept) < len(counts) and itos == ["<eos>", *kept, "<unk>"]


def test_dataset_char_run_scores_bits_per_character(tmp_path):
    files = write_text_corpus(tmp_path / "corpus")
    folder = save_dataset_dict(files, tmp_path / "ds", ("tr", "va", "te"))
    overrides = ["data.source=hf", f"data.path={folder}", "data.train_split=tr", "data.valid_split=va",
                 "data.test_split=te", "data.level=char", f"data.cache_dir={tmp_path / 'cache'}"]
    assert train(overrides, tmp_path / "runs", "c", "train.max_steps=3") == 0
    test = metrics(tmp_path / "runs" / "c")[-1]
    # one token per character and per line end: bpc of the tokens is bpc of the raw text
    assert test["tokens"] == raw_chars(files["test"])
    assert test["bpc"] == pytest.approx(test["loss"] / math.log(2), rel=1e-12)
    assert test["bpc_raw"] == pytest.approx(test["bpc"], rel=1e-12)


# ----------------------------------------------------------------------------- sampling


def sample(capsys, *args):
    code = sample_script.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_is_seeded_and_greedy_is_the_argmax(sp_run, capsys):
    best = sp_run["run"] / "best.pt"
    code, a, _ = sample(capsys, best, "--tokens", 25, "--seed", 3, "--prompt", "the cat")
    assert code == 0 and a.startswith("the cat")
    assert sample(capsys, best, "--tokens", 25, "--seed", 3, "--prompt", "the cat")[1] == a
    assert sample(capsys, best, "--tokens", 25, "--seed", 4, "--prompt", "the cat")[1] != a

    ckpt = checkpoint.load(best)
    cfg = config_from_dict(ckpt["config"])
    tok = tokenizer_from_checkpoint(ckpt, cfg.data, "best")
    model = LanguageModel(cfg.model, len(tok))
    model.load_state_dict(checkpoint.eval_weights(ckpt))
    model.eval()
    ids = [tok.eos_id] + tok.encode_prompt("the cat")
    with torch.no_grad():
        for _ in range(12):
            logits, _, _ = model(torch.tensor(ids).view(-1, 1))
            ids.append(int(logits[-1, 0].argmax()))
    expected = tok.decode(ids[1:])
    assert sample(capsys, best, "--tokens", 12, "--top-k", 1, "--prompt", "the cat")[1] == expected + "\n"


def test_sample_ptb_characters_show_spaces(tiny_ptb, tmp_path, capsys):
    assert train_script.main([str(REPO / "recipes/char_ptb.yaml"),
                              *tiny_overrides(tiny_ptb, tmp_path, **{"train.max_steps": 2})]) == 0
    capsys.readouterr()
    code, out, _ = sample(capsys, tmp_path / "char_ptb" / "best.pt", "--tokens", 200, "--prompt", "the cat")
    assert code == 0 and out.startswith("the cat") and "_" not in out
    code, _, err = sample(capsys, tmp_path / "char_ptb" / "best.pt", "--prompt", "The Cat")
    assert code == 2 and err.startswith("error: --prompt: token 'T' is not in the run's ptb_char vocabulary")


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens must be a positive number of tokens, got 0"),
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
])
def test_sample_argument_errors(sp_run, capsys, args, message):
    code, out, err = sample(capsys, sp_run["run"] / "best.pt", *args)
    assert code == 2 and out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1


def test_sample_device_defaults_to_auto_as_in_training(sp_run, capsys, monkeypatch):
    """train.device's default is auto (CUDA when present); flipout_lstm.sample's was cpu."""
    asked, real = [], sample_script.resolve_device
    monkeypatch.setattr(sample_script, "resolve_device", lambda name: asked.append(name) or real(name))
    code, out, _ = sample(capsys, sp_run["run"] / "best.pt", "--tokens", 3)
    assert code == 0 and out and asked == ["auto"]


def test_sample_missing_checkpoint(tmp_path, capsys):
    code, _, err = sample(capsys, tmp_path / "none.pt")
    assert code == 2 and "not found" in err and err.count("\n") == 1
