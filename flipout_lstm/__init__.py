"""Regularized LSTM language models: flipout, weight drop and the classic recurrent baselines."""
