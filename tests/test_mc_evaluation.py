"""``evaluate.py --mc-samples K``: the predictive distribution averaged over K noise draws."""
import json
import math

import pytest
import torch

import evaluate as evaluate_script
from conftest import REPO, train_tiny
from flipout_lstm.config import ModelConfig
from flipout_lstm.evaluation import evaluate_mc
from flipout_lstm.model import LanguageModel

NO_NOISE = {"model.embedding_dropout": 0, "model.input_dropout": 0, "model.layer_dropout": 0,
            "model.output_dropout": 0, "model.lstm.weight_drop": 0, "model.lstm.flipout": "false"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def trained(tiny_ptb, out, **extra):
    assert train_tiny("word_ptb", tiny_ptb, out, **{"train.max_steps": 6, **extra}) == 0
    return out / "word_ptb" / "best.pt"


def score(best, tiny_ptb, *flags):
    return evaluate_script.run(evaluate_script.parse_args(
        [str(best), "--split", "valid", "--data-root", str(tiny_ptb), "--no-progress", *flags]))


def test_without_noise_the_mc_figure_is_the_deterministic_one(tiny_ptb, tmp_path):
    best = trained(tiny_ptb, tmp_path, **NO_NOISE)
    result = score(best, tiny_ptb, "--mc-samples", "4")
    assert result["mc_samples"] == 4 and result["tokens"] > 0
    assert result["mc_loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert result["mc_ppl"] == pytest.approx(result["ppl"], rel=1e-5)


def test_with_noise_the_mc_figure_differs_is_finite_and_repeatable(tiny_ptb, tmp_path, capsys):
    best = trained(tiny_ptb, tmp_path)  # word_ptb: dropout everywhere and flipout DropConnect
    first = score(best, tiny_ptb, "--mc-samples", "3")
    assert math.isfinite(first["mc_loss"]) and first["mc_loss"] > 0
    assert abs(first["mc_loss"] - first["loss"]) > 1e-4 * first["loss"]
    assert score(best, tiny_ptb, "--mc-samples", "3")["mc_loss"] == first["mc_loss"]  # --seed 0
    assert score(best, tiny_ptb, "--mc-samples", "3", "--seed", "1")["mc_loss"] != first["mc_loss"]
    # Both figures, in text and in JSON.
    capsys.readouterr()
    assert evaluate_script.main([str(best), "--split", "valid", "--data-root", str(tiny_ptb),
                                 "--no-progress", "--mc-samples", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == first["loss"] and printed["mc_loss"] == first["mc_loss"]
    assert {"ppl", "mc_ppl", "mc_samples", "mc_seed"} <= printed.keys()
    assert evaluate_script.main([str(best), "--split", "valid", "--data-root", str(tiny_ptb),
                                 "--no-progress", "--mc-samples", "3"]) == 0
    text = capsys.readouterr().out
    assert f"ppl {first['ppl']:.4f}" in text
    assert f"Monte Carlo over 3 noise samples: loss {first['mc_loss']:.4f} nats, " \
           f"ppl {first['mc_ppl']:.4f}" in text


def test_probabilities_are_averaged_not_losses():
    """Averaging K draws' probabilities scores better than one draw (Jensen: the log of a mean
    is at least the mean of the logs); averaging their losses would not, on average."""
    cfg = ModelConfig(embedding_size=8, hidden_size=8, num_layers=1, output_dropout=0.5,
                      input_dropout=0.5)
    model = LanguageModel(cfg, 12)
    with torch.no_grad():  # confident predictions, so that dropout changes them a lot
        model.decoder.weight.mul_(30)
        model.embedding.weight.mul_(10)
    data = torch.randint(1, 12, (400,), generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=4, bptt=10, bos_id=0, device=torch.device("cpu"))
    model.eval()
    for seed in range(3):
        torch.manual_seed(seed)
        one = evaluate_mc(model, data, samples=1, **kw)
        torch.manual_seed(seed)
        many = evaluate_mc(model, data, samples=8, **kw)
        assert many["tokens"] == one["tokens"] == 400 and many["samples"] == 8
        assert many["loss"] < one["loss"] - 0.1  # measured: about 0.3 lower
    assert not model.training  # the mode it found is restored


def test_mc_samples_must_be_positive(tiny_ptb, tmp_path):
    best = trained(tiny_ptb, tmp_path, **{"train.max_steps": 1})
    assert evaluate_script.main([str(best), "--data-root", str(tiny_ptb), "--mc-samples", "0"]) == 2
