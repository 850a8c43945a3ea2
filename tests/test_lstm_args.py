"""Bad LSTM arguments raise ValueError with a message that names the argument and the fix."""
import pytest
import torch

from flipout_lstm.errors import UserError
from flipout_lstm.nn import LSTM
from flipout_lstm.nn.lstm import LSTMArgumentError


@pytest.mark.parametrize("name", ["dropout", "weight_drop", "input_weight_drop", "hidden_dropout",
                                  "zoneout_cell", "zoneout_hidden", "cell_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_probability_out_of_range(name, value):
    with pytest.raises(LSTMArgumentError, match=rf"^{name}: {value!r} is not a probability in \[0, 1\)") as err:
        LSTM(3, 4, **{name: value})
    assert err.value.argument == name


@pytest.mark.parametrize("name", ["weight_noise", "input_weight_noise"])
@pytest.mark.parametrize("value", [-0.5, float("inf")])
def test_bad_sigma(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: {value!r} must be a finite standard deviation >= 0"):
        LSTM(3, 4, **{name: value})


def test_flipout_without_perturbation():
    with pytest.raises(ValueError, match=r"^flipout: flipout needs a weight perturbation.*weight_drop=0.5"):
        LSTM(3, 4, flipout=True, hidden_dropout=0.2)


@pytest.mark.parametrize("name", ["weight_drop", "input_weight_drop"])
def test_flipout_dropconnect_must_be_half(name):
    with pytest.raises(ValueError, match=rf"^{name}: flipout DropConnect needs exactly 0.5 .*symmetric"
                                         rf".*got 0.3; use 0.5, or {name.replace('drop', 'noise')}"):
        LSTM(3, 4, flipout=True, **{name: 0.3})


def test_drop_and_noise_on_one_matrix():
    with pytest.raises(ValueError, match="^weight_drop: cannot be combined with weight_noise"):
        LSTM(3, 4, weight_drop=0.5, weight_noise=0.1)


def test_the_config_asks_the_layer(monkeypatch):
    """flipout_lstm.config has no copy of the rules: a rule the layer adds is one the config enforces,
    in the config's own key names."""
    from flipout_lstm.config import load_config
    from flipout_lstm.errors import ConfigError
    from flipout_lstm.nn import lstm

    real = lstm.check_regularizers

    def stricter(args, name=str):
        real(args, name)
        if args.get("hidden_dropout", 0) > 0.5:
            raise lstm.LSTMArgumentError(f"{name('hidden_dropout')}: above 0.5 (a new rule)", "hidden_dropout")

    monkeypatch.setattr("flipout_lstm.config.check_regularizers", stricter)
    with pytest.raises(ConfigError, match=r"^model.lstm.hidden_dropout: above 0.5 \(a new rule\)"):
        load_config(None, ["model.lstm.hidden_dropout=0.6"])
    assert load_config(None, ["model.lstm.hidden_dropout=0.4"]).model.lstm.hidden_dropout == 0.4


@pytest.mark.parametrize("kw,match", [(dict(bidirectional=True), "bidirectional"),
                                      (dict(proj_size=2), "proj_size"),
                                      (dict(num_layers=0), "num_layers")])
def test_unsupported(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTM(3, 4, **kw)


def test_the_layer_raises_value_error_not_the_trainers_errors():
    """flipout_lstm.nn is reusable on its own: its errors are ValueErrors, not flipout_lstm.errors' UserError."""
    with pytest.raises(ValueError) as err:
        LSTM(3, 4, weight_drop=2.0)
    assert not isinstance(err.value, UserError)


def test_bad_forward_arguments():
    lstm = LSTM(3, 4, 1, weight_noise=0.5, flipout=True, zoneout_cell=0.2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="batch_size=3"):
        lstm(x, noise=lstm.sample_noise(3))
    with pytest.raises(ValueError, match="seq_len=4"):
        lstm(x, noise=lstm.sample_noise(2, seq_len=4))
    with pytest.raises(ValueError, match="input.size"):
        lstm(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="h0 and c0"):
        lstm(x, (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
