"""What a training run carries from one step to the next, saved and restored as one object.

A training checkpoint (``ckpt-*.pt``, ``last.pt``) is :meth:`TrainingState.checkpoint`, read
back by :meth:`TrainingState.restore`; ``best.pt`` is :meth:`TrainingState.best`. Each is the
run's header (format, config, vocabulary, tokenizer: the same for every checkpoint of a run)
plus this state, so writing, reading and :data:`KEYS` (what ``--resume`` requires of a file,
flipout_lstm.checkpoint.load_latest) agree in one place.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from flipout_lstm import checkpoint, distributed
from flipout_lstm.seeds import seed_everything

# What a training checkpoint holds beyond the header: --resume refuses a file without them.
# (It may also hold "scaler", fp16's gradient scaler, and "rng_ranks", every DDP rank's RNG.)
KEYS = frozenset({"model", "optimizer", "schedule", "early_stopping", "progress", "base_lr", "rng",
                  "hidden"})


@dataclass
class Progress:
    """Where the loop stands; saved as a plain dict under ``"progress"``."""
    epoch: int = 0            # epochs finished
    batch: int = 0            # batches of the current epoch done
    step: int = 0             # steps taken, skipped non-finite ones included
    skipped: int = 0          # steps skipped for a non-finite loss or gradient
    window_loss: float = 0.0  # the losses since the last train line of metrics.jsonl, summed
    window_steps: int = 0
    last_eval: int = -1       # the step of the last validation
    last_ckpt: int = -1       # the step of the last training checkpoint
    metrics_lines: int = 0    # lines of metrics.jsonl this state accounts for
    wall_seconds: float = 0.0  # the loop's wall time, evaluations included (run.json)
    step_seconds: float = 0.0  # the training steps' alone
    tokens_seen: int = 0
    eval_walls: list = field(default_factory=list)  # [step, wall seconds] of each validation
    segments: list = field(default_factory=list)    # one provenance record per start or resume

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        """A saved progress dict; counters an older checkpoint lacks start from their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


class TrainingState:
    """The model, optimizer, schedule, early stopping, gradient scaler (fp16), learning rate,
    carried LSTM state and :class:`Progress` of a run, with the clocks of its wall time."""

    def __init__(self, model, optimizer, schedule, stopper, scaler, base_lr: float):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.stopper, self.scaler, self.base_lr = stopper, scaler, base_lr
        self.progress = Progress()
        self.hidden = None  # the LSTM state carried across batches (data.carry_state)
        self.clock = time.perf_counter()  # wall time up to here is in progress.wall_seconds
        self.saved_at = self.clock        # when this process last wrote a checkpoint (or started)

    def tick(self) -> None:
        """Add the wall time since the last tick to ``progress.wall_seconds``."""
        now = time.perf_counter()
        self.progress.wall_seconds += now - self.clock
        self.clock = now

    def wall(self) -> float:
        """The run's wall time so far, this process's segment included."""
        return self.progress.wall_seconds + time.perf_counter() - self.clock

    def checkpoint(self, header: dict, metrics_lines: int) -> dict:
        """Everything needed to continue exactly where the loop stands now; ``metrics_lines``
        is how many lines of metrics.jsonl it accounts for."""
        self.tick()
        self.progress.metrics_lines = metrics_lines
        self.progress.last_ckpt = self.progress.step
        return {**header, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "early_stopping": self.stopper.state_dict(),
                "progress": dataclasses.asdict(self.progress), "base_lr": self.base_lr,
                "rng": checkpoint.rng_state(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "hidden": as_cpu(self.hidden)}

    def best(self, header: dict, valid_loss: float) -> dict:
        """``best.pt``: the weights validation scores (NT-ASGD's average once it runs)."""
        return {**header, "model": self.schedule.eval_model().state_dict(),
                "progress": dataclasses.asdict(self.progress), "valid_loss": valid_loss}

    def restore(self, saved: dict, source, cols=slice(None), device="cpu") -> None:
        """Continue from the training checkpoint ``saved`` (read from ``source``): this rank's
        columns ``cols`` of the carried state, on ``device``. The RNG is :meth:`restore_rng`'s."""
        checkpoint.load_model_state(self.model, saved["model"], source)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.schedule.load_state_dict(saved["schedule"])
        self.stopper.load_state_dict(saved["early_stopping"])
        self.progress = Progress.from_dict(saved["progress"])
        self.base_lr = saved["base_lr"]
        self.hidden = None if saved["hidden"] is None else [
            (h[cols].to(device), c[cols].to(device)) for h, c in saved["hidden"]]

    def restore_rng(self, saved: dict, ctx: distributed.Context, ddp_noise: str, seed: int,
                    source) -> str | None:
        """The generators as the checkpoint left them, for this rank. Returns a note where they
        cannot continue: a per-rank checkpoint resumed by another number of processes."""
        rngs = saved.get("rng_ranks") or [saved["rng"]]  # one per rank that wrote it
        if ddp_noise == "global":  # every rank held the same stream: any world size goes on
            checkpoint.set_rng_state(rngs[0])
        elif len(rngs) == ctx.world:
            checkpoint.set_rng_state(rngs[ctx.rank])
        else:  # weights and data order continue, noise does not
            seed_everything(distributed.noise_seed(seed, ctx.rank, self.progress.step))
            return (f"note: {source} was written by {len(rngs)} process(es) and is resumed by "
                    f"{ctx.world}; the noise and dropout streams restart, so the losses will not "
                    f"repeat those of an uninterrupted run")
        return None


def as_cpu(hidden) -> list | None:
    """Carried LSTM state as CPU tensors (a checkpoint's ``"hidden"``)."""
    return None if hidden is None else [(h.cpu(), c.cpu()) for h, c in hidden]
