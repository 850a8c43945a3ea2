"""A trained model back from its checkpoint: how ``evaluate.py``, ``flipout_lstm.sample`` and the
gradient-variance experiment rebuild what ``train.py`` saved.

A checkpoint carries its resolved config, its tokenizer and its weights (the NT-ASGD average
where training switched to it, :func:`flipout_lstm.checkpoint.eval_weights`), so the model is rebuilt
with the training run's own architecture and ids, whatever recipe files say now.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flipout_lstm import checkpoint
from flipout_lstm.config import Config, config_from_dict
from flipout_lstm.data.tokenizers import Tokenizer, tokenizer_from_checkpoint
from flipout_lstm.errors import CheckpointError, ConfigError
from flipout_lstm.model import LanguageModel


@dataclass
class Trained:
    model: LanguageModel  # in eval mode, on the device asked for
    config: Config  # the training run's resolved config
    tokenizer: Tokenizer
    ckpt: dict  # the checkpoint as loaded (progress, schedule, ...)


def load_trained(path, device: torch.device | str = "cpu") -> Trained:
    """The model saved at ``path`` (a ``best.pt``, ``last.pt`` or ``ckpt-*.pt``) on ``device``."""
    ckpt = checkpoint.load(path, map_location=device)
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its config does not validate: {exc}") from None
    tokenizer = tokenizer_from_checkpoint(ckpt, cfg.data, path)
    model = LanguageModel(cfg.model, len(tokenizer))
    checkpoint.load_model_state(model, checkpoint.eval_weights(ckpt), path)
    return Trained(model=model.to(device).eval(), config=cfg, tokenizer=tokenizer, ckpt=ckpt)
