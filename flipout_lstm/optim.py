"""Optimizers and the learning-rate schedules: step decay, NT-ASGD, epoch steps, early stopping.

``step`` follows the epoch count alone (Zaremba et al. 2014; PyTorch's ``StepLR``): epoch ``e``
(counted from 0) trains at

    lr_e = lr / lr_decay^k,   k = 0 if e < decay_start, else 1 + floor((e - decay_start) / decay_every)

so ``decay_start=4, decay_every=1, lr_decay=2`` is "4 epochs at lr, then halve after every
epoch". It is a pure function of the epoch, so a resumed run needs no state to continue it.
The other schedules are driven by validation losses:

The non-monotonic trigger of Merity et al. (2017): after an evaluation with loss ``v``, with
``history`` the losses of all earlier evaluations,

    fires  iff  len(history) > n  and  v > min(history[:-n])

i.e. the new loss is worse than the best of all but the last ``n`` evaluations. On a firing,
``decay`` divides every learning rate by ``lr_decay`` (the paper's word-level rule, factor 4);
``ntasgd`` switches once from SGD to averaged SGD: the iterates from then on are averaged
(``torch.optim.swa_utils.AveragedModel``, equal weights), and evaluation and checkpoints use
the average.

Which evaluations the criterion looks at after a decay (``optim.decay_rule``). Merity et al.
define the trigger for a switch that happens once (NT-ASGD), so it never has to say. Taken
literally at every evaluation (``every_eval``), the evaluation right after a decay is still
compared with the same old best; unless one evaluation at the new rate beats it, the rate is
divided again at once, possibly at several consecutive evaluations (by 4, 16, 64, ...), before
the new rate has had time to act. The default, ``once_per_window``, reads the rule as its
authors use it: it judges ``n`` evaluations of training at one rate. After a firing the history
starts again from the evaluation that fired (the loss the new rate starts from), so the
criterion needs ``n`` new evaluations before it can fire again, and then compares with the
best since the decay. With ``v_f`` the evaluation that last fired (``f = 0`` before any),

    history_k = [v_f, v_{f+1}, ..., v_{k-1}]    (every_eval: [v_0, ..., v_{k-1}] always)
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from flipout_lstm.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, amsgrad=cfg.name == "amsgrad")


class Schedule:
    """Learning-rate schedule driven by validation losses (see the module docstring)."""

    def __init__(self, cfg: OptimConfig, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.cfg = cfg
        self.optimizer = optimizer
        self.model = model
        self.history: list[float] = []  # every validation loss, in order
        self.start = 0  # history[start:] is what the criterion sees (once_per_window)
        self.fired = 0
        self.averaged: AveragedModel | None = None

    def start_epoch(self, epoch: int) -> str | None:
        """Set the rate epoch ``epoch`` (from 0) trains at under ``step``; a message if it changed."""
        cfg = self.cfg
        if cfg.schedule != "step":
            return None
        k = 0 if epoch < cfg.decay_start else 1 + (epoch - cfg.decay_start) // cfg.decay_every
        lr = cfg.lr / cfg.lr_decay ** k
        if lr == self.lr:
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return f"epoch {epoch + 1}: learning rate {lr:.4g} (optim.lr / {cfg.lr_decay:g}^{k})"

    def nonmono_fires(self, val_loss: float) -> bool:
        n, seen = self.cfg.nonmono, self.history[self.start:]
        return len(seen) > n and val_loss > min(seen[:-n])

    def after_eval(self, val_loss: float) -> str | None:
        """Record a validation loss; return a message if the schedule acted."""
        msg = None
        if self.cfg.schedule != "constant" and self.nonmono_fires(val_loss):
            if self.cfg.schedule == "decay":
                self.fired += 1
                for group in self.optimizer.param_groups:
                    group["lr"] /= self.cfg.lr_decay
                msg = f"non-monotonic trigger: learning rate divided by {self.cfg.lr_decay:g} " \
                      f"to {self.lr:.4g}"
                if self.cfg.decay_rule == "once_per_window":
                    self.start = len(self.history)  # this evaluation opens the next window
            elif self.averaged is None:
                self.fired += 1
                self.averaged = AveragedModel(self.model, use_buffers=True)
                msg = "non-monotonic trigger: switching to averaged SGD (NT-ASGD)"
        self.history.append(val_loss)
        return msg

    def after_step(self) -> None:
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)

    def eval_model(self) -> torch.nn.Module:
        """The weights to evaluate and to save as best: the average once NT-ASGD is on."""
        return self.model if self.averaged is None else self.averaged.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "start": self.start,
            "fired": self.fired,
            "averaged": None if self.averaged is None else self.averaged.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(v) for v in state["history"]]
        self.start = int(state.get("start", 0))  # absent from checkpoints older than the option
        self.fired = int(state["fired"])
        self.averaged = None
        if state["averaged"] is not None:
            self.averaged = AveragedModel(self.model, use_buffers=True)
            self.averaged.load_state_dict(state["averaged"])


class EarlyStopping:
    """Stop after ``patience`` evaluations without a new best validation loss (0: never)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("inf")
        self.bad = 0

    def update(self, val_loss: float) -> bool:
        """Record a loss; True if it is a new best."""
        if val_loss < self.best:
            self.best, self.bad = val_loss, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])
