"""Bad LSTM arguments raise ValueError with a message that names the argument and the fix."""
import pytest
import torch

from lm.errors import UserError
from lm.nn import LSTM


@pytest.mark.parametrize("name", ["dropout", "weight_drop", "input_weight_drop", "hidden_dropout",
                                  "zoneout_cell", "zoneout_hidden", "cell_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_probability_out_of_range(name, value):
    with pytest.raises(ValueError, match=rf"{name}=.*0 <= {name} < 1"):
        LSTM(3, 4, **{name: value})


@pytest.mark.parametrize("name", ["weight_noise", "input_weight_noise"])
def test_negative_sigma(name):
    with pytest.raises(ValueError, match=rf"{name}=-0.5 must be .*>= 0"):
        LSTM(3, 4, **{name: -0.5})


def test_flipout_without_perturbation():
    with pytest.raises(ValueError, match=r"flipout=True needs a weight perturbation.*weight_drop=0.5"):
        LSTM(3, 4, flipout=True, hidden_dropout=0.2)


@pytest.mark.parametrize("name", ["weight_drop", "input_weight_drop"])
def test_flipout_dropconnect_must_be_half(name):
    with pytest.raises(ValueError, match=rf"{name}=0.3 with flipout=True: only p=0.5 .*symmetric"
                                         rf".*noise=sigma"):
        LSTM(3, 4, flipout=True, **{name: 0.3})


def test_drop_and_noise_on_one_matrix():
    with pytest.raises(ValueError, match="weight_drop and weight_noise are both set"):
        LSTM(3, 4, weight_drop=0.5, weight_noise=0.1)


@pytest.mark.parametrize("kw,match", [(dict(bidirectional=True), "bidirectional"),
                                      (dict(proj_size=2), "proj_size"),
                                      (dict(num_layers=0), "num_layers")])
def test_unsupported(kw, match):
    with pytest.raises(ValueError, match=match):
        LSTM(3, 4, **kw)


def test_errors_are_user_errors():
    with pytest.raises(UserError):
        LSTM(3, 4, weight_drop=2.0)


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
