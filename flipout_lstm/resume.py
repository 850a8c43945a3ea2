"""Resume matching: whether a checkpoint may continue under the recipe given now, whether its
run has anything left to train, and what a run stopped at once leaves to resume from.

The field roles it applies (``bound``, ``bookkeeping``, the rest fixing the experiment) are the
config's own metadata (:func:`flipout_lstm.config.resume_changes`); the files it reads are the run
directory's (flipout_lstm/checkpoint.py, ``metrics.jsonl``).
"""
from __future__ import annotations

from pathlib import Path

from flipout_lstm import checkpoint
from flipout_lstm.config import Config, resume_changes
from flipout_lstm.errors import CheckpointError


def check_config(cfg: Config, saved: dict, path: Path) -> list[str]:
    """A checkpoint resumes only into the same experiment: a changed field that fixes it is
    refused, naming every one; a changed bound or bookkeeping field is applied. Returns the
    applied changes as text (``"train.epochs 3 -> 5"``)."""
    applied, refused = resume_changes(saved, cfg)
    if refused:
        diffs = "; ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, a, b in refused)
        raise CheckpointError(f"cannot resume from {path}: the recipe differs in {diffs}; these fix "
                              f"the experiment, so resume with the run's own config.yaml, or start a "
                              f"new run with train.run_name=NAME")
    return [f"{k} {a!r} -> {b!r}" for k, a, b in applied]


def finished_because(tc, step: int, epoch: int, stopper) -> str | None:
    """Why a run at ``step`` with ``epoch`` epochs done and early-stopping state ``stopper``
    has nothing left to train under the bounds of ``tc`` (the train section), or None."""
    if tc.max_steps and step >= tc.max_steps:
        return f"it reached train.max_steps={tc.max_steps}; raise train.max_steps to train it further"
    if stopper.should_stop:
        return (f"early stopping ended it ({stopper.bad} evaluations without a new best, "
                f"train.patience={tc.patience}); raise train.patience to train it further")
    if epoch >= tc.epochs:
        return f"it trained train.epochs={tc.epochs} epochs; raise train.epochs to train it further"
    return None


def scored_on_test(run_dir: Path, metrics_lines: int) -> bool:
    """The run's end was written: metrics.jsonl holds the best checkpoint's test line after the
    ``metrics_lines`` lines the checkpoint accounts for (a run killed before scoring has none)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    return any('"split": "test"' in line and '"best": true' in line for line in lines[metrics_lines:])


def stopped_at_once(run_dir: Path, resume_cmd: str, start_cmd: str) -> str:
    """What a second Ctrl-C leaves: the newest checkpoint (written whole, see flipout_lstm.signals)."""
    found = checkpoint.numbered(run_dir)
    if not found:
        return f"no checkpoint had been written yet; start again with: {start_cmd}"
    step = int(checkpoint.CKPT_RE.match(found[-1].name).group(1))
    return (f"the step in progress is not saved; the newest checkpoint {found[-1]} (step {step}) "
            f"is intact. Resume with: {resume_cmd}")


def last_good(run_dir: Path) -> str:
    """The newest numbered checkpoint, named in the errors that end a run."""
    found = checkpoint.numbered(run_dir)
    return str(found[-1]) if found else "none yet"
