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
import json
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from flipout_lstm import fileio
from flipout_lstm.errors import CheckpointError

FORMAT = 1
# What every checkpoint holds (a training checkpoint's further keys: flipout_lstm.training_state.KEYS).
REQUIRED = {"format", "config", "vocab", "model"}
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
        raise CheckpointError(_missing(path))
    what = _not_a_checkpoint(path)
    if what:
        raise CheckpointError(what)
    try:
        with warnings.catch_warnings():
            # Bytes that merely start like a pickle draw a warning about an odd "protocol"
            # before the error below: one line on stderr, not two.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses a pickled global (a callable, a class) by naming it: GLOBAL
        # posix.system. Any other unpickling failure is bytes that are no pickle at all.
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects (e.g. a callable), "
                f"not just tensors and plain data; only checkpoints written by this trainer load"
            ) from None
        # A whole zip archive is torch's own format with a damaged pickle inside it.
        raise CheckpointError(_truncated(path, "unreadable pickled data") if zipfile.is_zipfile(path)
                              else _unrecognised(path)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(_truncated(path, _reason(exc))) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not REQUIRED <= obj.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (format {FORMAT}); "
                              f"pass a best.pt, last.pt or ckpt-*.pt written by train.py")
    return obj


def _truncated(path: Path, reason: str) -> str:
    return f"checkpoint {path} is truncated or corrupted ({reason}); use an earlier checkpoint"


def _unrecognised(path: Path) -> str:
    return (f"{path} is not a PyTorch checkpoint (unrecognised bytes); pass a best.pt, last.pt "
            f"or ckpt-*.pt written by train.py")


def _reason(exc: Exception) -> str:
    """torch's reason for an unreadable file as one short clause.

    Its messages run to 300 characters of advice about miniz and file transfers; what the user
    needs is what is wrong: a zip archive without its central directory, or a pickle that
    stops short, is a file that ends too soon.
    """
    text = " ".join(str(exc).split())
    if isinstance(exc, EOFError) or "central directory" in text or "unexpected EOF" in text:
        return "unexpected end of file"
    first = text.split(". ")[0].rstrip(".") or type(exc).__name__
    return first if len(first) <= 80 else first[:77] + "..."


def _missing(path: Path) -> str:
    """Why ``path`` cannot be read, and what to pass instead."""
    if path.is_dir():
        inside = [p for p in (path / "best.pt", path / "last.pt") if p.is_file()]
        example = inside[0] if inside else path / "best.pt"
        return (f"{str(path)!r} is a folder; pass a checkpoint file in it, e.g. {example}")
    newest = [p for p in [path.parent / "last.pt"] + numbered(path.parent)[::-1] if p.is_file()]
    if path.name == "best.pt" and newest:
        return (f"{path} does not exist yet: best.pt is written at the run's first validation "
                f"(the end of the first epoch, or train.eval_every steps); pass {newest[0]}, "
                f"its newest checkpoint, meanwhile")
    return (f"checkpoint {str(path)!r} not found; pass the path of a .pt file in a run "
            f"directory, e.g. checkpoints/<run>/best.pt")


def _not_a_checkpoint(path: Path) -> str | None:
    """A message for a file that is plainly no checkpoint, saying what it is instead: empty, a
    zip archive cut short, bytes of no known kind, or text (a recipe, a metrics log, any text).

    torch.save writes a zip archive (magic ``PK\\x03\\x04``, its central directory at the end;
    older torch a pickle, first byte ``0x80``): a whole archive or a pickle goes on to
    torch.load, which judges the rest. Other binary bytes are named here, since torch.load's
    weights_only error for them reads like a pickled callable's. Anything that reads as UTF-8
    text is sniffed: JSON objects one per line is a metrics log, a YAML mapping a recipe.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] == b"PK\x03\x04":
        # A zip archive ends with its central directory: without one it was cut short.
        return None if zipfile.is_zipfile(path) else _truncated(path, "unexpected end of file")
    if head[:1] == b"\x80":
        return None  # a pickle (torch's legacy format): let torch.load judge it
    if not head:
        return f"{path} is empty (0 bytes), not a checkpoint; {_instead(path)}"
    if b"\x00" in head:
        return _unrecognised(path)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut by the 64 KiB read
            return _unrecognised(path)
        text = head[:exc.start].decode("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(head) == (1 << 16) and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    instead = _instead(path)
    try:
        records = [json.loads(line) for line in lines]
    except ValueError:
        records = []
    if records and all(isinstance(r, dict) for r in records):
        return (f"{path} is a metrics log (JSON lines written by train.py), not a checkpoint; "
                f"{instead}")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError:
        recipe = None
    if isinstance(recipe, dict) or path.suffix in (".yaml", ".yml"):
        return (f"{path} is a YAML recipe, not a checkpoint: train it with `python train.py "
                f"{path}`, then pass the run's checkpoint, e.g. checkpoints/<run>/best.pt")
    return (f"{path} is a text file, not a checkpoint; pass a best.pt, last.pt or ckpt-*.pt "
            f"written by train.py, e.g. checkpoints/<run>/best.pt")


def _instead(path: Path) -> str:
    """What to pass instead of ``path``: the run's own best.pt or last.pt, if it has one."""
    ours = [p for p in (path.parent / "best.pt", path.parent / "last.pt")
            if p.is_file() and p.name != path.name]
    return f"pass {ours[0]}" if ours else "pass a checkpoint such as checkpoints/<run>/best.pt"


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


def stopped_before_first_checkpoint(run_dir: Path) -> str:
    """The way out for a run directory with a best.pt but nothing to resume from (the run
    failed after its first validation, before its first ckpt-*.pt): neither resuming nor
    starting over in place can be right, so the user moves the old run aside."""
    return (f"nothing to resume in {run_dir}: it holds a best.pt but no last.pt or ckpt-*.pt "
            f"(the run stopped before its first checkpoint); move or delete {run_dir} to start "
            f"the run again, or choose another train.run_name=NAME")


def unusable_checkpoints(run_dir: Path, names: list) -> str:
    """The way out for a run whose checkpoints are all unusable: --resume has nothing to
    continue from, and a fresh start in place would mix the new run's checkpoints with the
    broken ones (the newest name, which --resume tries first, would be a broken file), so, as
    for a best.pt alone, the user moves the old run aside."""
    return (f"no usable checkpoint in {run_dir} ({', '.join(names)}: each is unreadable or "
            f"lacks the training state); move or delete {run_dir} to start the run again, or "
            f"choose another train.run_name=NAME")


def _checkpoint_files(run_dir: Path) -> list:
    """last.pt, then ckpt-*.pt newest first: every file --resume tries, readable or not."""
    return [p for p in [run_dir / "last.pt"] + numbered(run_dir)[::-1] if p.is_file()]


def resumable(run_dir: Path) -> list:
    """The checkpoints ``--resume`` would try, in order (last.pt, then ckpt-*.pt newest first),
    less those plainly unreadable (empty, cut short, not a checkpoint at all).

    Where there are checkpoint files but every one is unreadable, raises CheckpointError
    (:func:`unusable_checkpoints`) rather than answer: an empty list would let a fresh start
    write over them, and a list of broken files sends the user to ``--resume``, which can
    only refuse them; the one way out is a fresh folder. So train.py's guard (``already holds
    checkpoints; pass --resume``), ``--resume`` and the sweep give the same answer. The check
    reads a file's first 64 KiB and its zip directory, not the whole file: one that passes it
    may still fail to load, and :func:`load_latest` then goes on to an older one.
    """
    files = _checkpoint_files(run_dir)
    whole = [p for p in files if _not_a_checkpoint(p) is None]
    if files and not whole:
        raise CheckpointError(unusable_checkpoints(run_dir, [p.name for p in files]))
    return whole


def load_latest(run_dir: Path, needs=frozenset(), warn=print) -> tuple[dict, Path]:
    """The newest checkpoint of a run that loads and holds the keys ``needs``, trying last.pt,
    then ckpt-*.pt newest first."""
    candidates = _checkpoint_files(run_dir)  # every one: each unreadable file gets its warning
    if not candidates and (run_dir / "best.pt").is_file():
        raise CheckpointError(stopped_before_first_checkpoint(run_dir))
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
        if not needs <= obj.keys():
            warn(f"warning: {path} lacks the training state ({', '.join(sorted(needs - obj.keys()))}); "
                 f"trying an older checkpoint")
            tried.append(path.name)
            continue
        return obj, path
    raise CheckpointError(unusable_checkpoints(run_dir, tried))


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
