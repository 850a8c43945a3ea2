"""Recurrent layers: ``LSTM`` with flipout, weight noise and recurrent-dropout baselines.

``LSTM`` (lstm.py) is ``torch.nn.LSTM`` plus noise; ``LSTMNoise`` / ``LayerNoise``
(noise.py) hold the random draws of one call; ``LSTMRecurrence`` (recurrence.py) is the
custom recurrence with its hand-written backward, whose per-step kernels are chosen by
timing (kernels.py) among torch ops, MKL packed and oneDNN products and a compiled cell
(fused_cell.py), with its large buffers kept between calls (workspace.py).
"""
from .lstm import LSTM, LSTMArgumentError
from .noise import LayerNoise, LSTMNoise
from .recurrence import LSTMRecurrence, lstm_recurrence

__all__ = ["LSTM", "LSTMArgumentError", "LSTMNoise", "LayerNoise", "LSTMRecurrence",
           "lstm_recurrence"]
