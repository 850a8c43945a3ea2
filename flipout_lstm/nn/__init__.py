"""Recurrent layers: ``LSTM`` with flipout, weight noise and recurrent-dropout baselines.

``LSTM`` (lstm.py) is ``torch.nn.LSTM`` plus noise; ``LSTMNoise`` / ``LayerNoise``
(noise.py) hold the random draws of one call; ``LSTMRecurrence`` (recurrence.py) is the
custom recurrence with its hand-written backward. Its matrix products follow one fixed rule
per device and dtype (products.py: oneDNN on the CPU, ``mm`` elsewhere), its pointwise cell
is compiled where it builds (fused_cell.py, else torch ops).
"""
from .lstm import LSTM, LSTMArgumentError
from .noise import LayerNoise, LSTMNoise
from .recurrence import LSTMRecurrence, lstm_recurrence

__all__ = ["LSTM", "LSTMArgumentError", "LSTMNoise", "LayerNoise", "LSTMRecurrence",
           "lstm_recurrence"]
