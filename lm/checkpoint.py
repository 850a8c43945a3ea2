"""Checkpoints: atomic writes, the newest K kept, safe loading, fallback past a corrupt file.

A run directory holds

    config.yaml          the resolved recipe
    vocab.json           the training vocabulary (ids used by every checkpoint of the run)
    ckpt-00001200.pt     full training state after step 1200 (the newest K are kept)
    last.pt              a hard link to the newest ckpt-*.pt (a copy where links fail)
    best.pt              the weights with the best validation loss, with config and vocabulary

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then
renamed over the target, so a crash leaves either the old file or the new one, never half of
one. Files are read with ``torch.load(weights_only=True)``: tensors and plain data only, so a
checkpoint carrying a pickled callable is refused instead of executed.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from lm import fileio
from lm.errors import CheckpointError

FORMAT = 1
# What every checkpoint holds, and what a training checkpoint adds for --resume.
REQUIRED = {"format", "config", "vocab", "model"}
TRAINING = REQUIRED | {"optimizer", "schedule", "early_stopping", "progress", "base_lr", "rng", "hidden"}
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


def save(obj: dict, path: Path) -> None:
    """Atomically serialize ``obj`` with torch.save; an OSError becomes a CheckpointError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        fileio.atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; earlier checkpoints are "
            f"intact; free disk space or fix the folder's permissions, then rerun with --resume"
        ) from None


def load(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass the path of a .pt file "
                              f"in a run directory, e.g. checkpoints/<run>/best.pt")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects (e.g. a callable), "
                f"not just tensors and plain data; only checkpoints written by this trainer load"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted ({exc}); use an earlier one") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({first}); "
                              f"use an earlier checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not REQUIRED <= obj.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (format {FORMAT}); "
                              f"pass a best.pt, last.pt or ckpt-*.pt written by train.py")
    return obj


def numbered(run_dir: Path) -> list[Path]:
    """The run's ckpt-*.pt files, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if CKPT_RE.match(p.name))


def save_training(obj: dict, run_dir: Path, step: int, keep: int) -> Path:
    """Write ``ckpt-<step>.pt``, point ``last.pt`` at it, delete all but the newest ``keep``."""
    path = run_dir / f"ckpt-{step:08d}.pt"
    save(obj, path)
    last = run_dir / "last.pt"
    tmp = run_dir / f".last.pt.tmp-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network filesystems): copy instead
            fileio.atomic_write_bytes(tmp, path.read_bytes())
        os.replace(tmp, last)
        fileio.fsync_dir(run_dir)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not update {last}: {exc.strerror or exc}; {path} was "
                              f"written and --resume will find it") from None
    for old in numbered(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: Path, warn=print) -> tuple[dict, Path]:
    """The newest checkpoint of a run that loads, trying last.pt, then ckpt-*.pt newest first."""
    candidates = [run_dir / "last.pt"] + numbered(run_dir)[::-1]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise CheckpointError(f"nothing to resume in {run_dir}: no last.pt or ckpt-*.pt; "
                              f"start the run without --resume")
    tried = []
    for path in candidates:
        try:
            obj = load(path)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying an older checkpoint")
            tried.append(path.name)
            continue
        if not TRAINING <= obj.keys():
            warn(f"warning: {path} lacks the training state ({', '.join(sorted(TRAINING - obj.keys()))}); "
                 f"trying an older checkpoint")
            tried.append(path.name)
            continue
        return obj, path
    raise CheckpointError(f"no usable checkpoint in {run_dir} (tried {', '.join(tried)}); "
                          f"start the run again without --resume")


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, NumPy and torch generator states in a form weights_only loading accepts."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def eval_weights(ckpt: dict) -> dict:
    """The weights to score: the NT-ASGD average where a training checkpoint has one (as the
    trainer validates and saves in best.pt), else the model's own."""
    averaged = (ckpt.get("schedule") or {}).get("averaged")
    if not averaged:
        return ckpt["model"]
    return {k[len("module."):]: v for k, v in averaged.items() if k.startswith("module.")}


def load_model_state(model: torch.nn.Module, state: dict, source) -> None:
    """``model.load_state_dict(state)``, or a one-line error saying which tensor differs."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source} holds no model weights (a mapping of names to tensors); "
                              f"pass a checkpoint written by train.py")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise CheckpointError(f"{source} does not fit this model: "
                              + (f"missing {', '.join(missing[:3])}" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"unexpected {', '.join(extra[:3])}" if extra else "")
                              + "; it was written for a different architecture")
    for key, value in own.items():
        theirs = state[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != value.shape:
            got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise CheckpointError(f"{source} does not fit this model: {key} is {got} in the "
                                  f"checkpoint but {tuple(value.shape)} in the model (a different "
                                  f"vocabulary or model size)")
    model.load_state_dict(state)
